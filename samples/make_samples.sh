#!/usr/bin/env bash
# Regenerates the committed speech samples (needs espeak-ng and ffmpeg).
set -euo pipefail
cd "$(dirname "$0")"
text="Hello from morag pipeline. The quick brown fox jumps over the lazy dog. Remote workers transcribe this talk on a graphics card."
tmp=$(mktemp --suffix .wav)
trap 'rm -f "$tmp"' EXIT
espeak-ng -s 150 -w "$tmp" "$text"
ffmpeg -y -loglevel error -i "$tmp" -ac 1 -ar 16000 -c:a libmp3lame -b:a 32k speech.mp3
ffmpeg -y -loglevel error -f lavfi -i "testsrc=size=160x120:rate=5" -i "$tmp" -shortest \
  -c:v libx264 -preset veryfast -crf 40 -pix_fmt yuv420p -c:a aac -b:a 32k -ac 1 talk.mp4
