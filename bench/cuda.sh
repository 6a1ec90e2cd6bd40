#!/usr/bin/env bash
# The engine's CUDA path in one run, for a machine with an NVIDIA GPU: the engine tests on the GPU
# (STREAMPLEX_TEST_DEVICE=cuda), then bench/chat.py (64 streams against Hugging Face generate) and
# bench/transcription.py (live Whisper base streams, p95 target 2 s). Each part's output goes to
# $OUT (default /tmp/streamplex-cuda) as it runs; a failing part does not stop the next.
# Speech for the Whisper parts comes from espeak-ng, or from STREAMPLEX_SPEECH_CACHE where the machine has none.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/streamplex-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"

echo "== engine tests on CUDA" >&2
STREAMPLEX_TEST_DEVICE=cuda timeout "${ENGINE_TESTS_TIMEOUT:-240}" "$py" -m pytest -q -p no:cacheprovider tests/server/engine \
  --ignore tests/server/engine/test_embedding_runner.py 2>&1 | tee "$out/engine-tests.txt" || status=1

echo "== bench/chat.py, 64 streams" >&2
timeout "${CHAT_TIMEOUT:-240}" "$py" bench/chat.py --streams "${CHAT_STREAMS:-64}" --tokens 64 --parts references,server \
  --json "$out/chat.json" 2>&1 | tee "$out/chat.txt" || status=1

echo "== bench/transcription.py, live streams" >&2
timeout "${TRANSCRIPTION_TIMEOUT:-240}" "$py" bench/transcription.py --parts server --ks "${TRANSCRIPTION_KS:-16,32,48}" --target 2.0 \
  --keep-going --json "$out/transcription.json" 2>&1 | tee "$out/transcription.txt" || status=1
exit $status
