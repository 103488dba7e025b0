#!/usr/bin/env bash
# Regenerates the committed speech samples (needs espeak-ng and ffmpeg; made with
# espeak-ng 1.51). The text is plain words spoken by espeak-ng's en-us voice at 145
# words a minute: the bundled tiny.en model hears every word of it in speech.mp3 and
# in talk.mp4, read directly or through the pipeline's ffmpeg step.
# tests/unit/test_sample_transcripts.py reads the text below and checks that
# `morag-pipeline run` transcribes each sample with a word error rate of at most 10 %.
set -euo pipefail
cd "$(dirname "$0")"
text="Welcome to the speech pipeline. Remote workers turn your recordings into text on a graphics card, and send the words back to you."
tmp=$(mktemp --suffix .wav)
trap 'rm -f "$tmp"' EXIT
espeak-ng -v en-us -s 145 -w "$tmp" "$text"
ffmpeg -y -loglevel error -i "$tmp" -ac 1 -ar 16000 -c:a libmp3lame -b:a 32k speech.mp3
ffmpeg -y -loglevel error -f lavfi -i "testsrc=size=160x120:rate=5" -i "$tmp" -shortest \
  -c:v libx264 -preset veryfast -crf 40 -pix_fmt yuv420p -c:a aac -b:a 32k -ac 1 talk.mp4
