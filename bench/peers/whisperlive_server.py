"""WhisperLive's server (faster-whisper backend, one model shared by all clients) on a CTranslate2 folder, for `bench/transcription.py --peer whisperlive`.

Run with the Python of the venv made by bench/peers/setup_whisperlive.sh (WhisperLive's pins live there, not in .venv).
"""

import argparse
import logging

from whisper_live.server import TranscriptionServer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--model", required=True, help="a CTranslate2 Whisper folder")
parser.add_argument("--max-clients", type=int, default=16)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)
TranscriptionServer().run(
    "127.0.0.1",
    port=args.port,
    backend="faster_whisper",
    faster_whisper_custom_model_path=args.model,
    single_model=True,
    max_clients=args.max_clients,
    max_connection_time=3600,
)
