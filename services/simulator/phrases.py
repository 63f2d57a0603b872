"""Assistant requests that Whisper tiny.en recognises reliably in every espeak-ng voice used."""

from __future__ import annotations

SENTENCES = [
    "turn on the kitchen lights",
    "what is the weather like tomorrow",
    "play some jazz music",
    "how far is the moon from the earth",
    "close the curtains in the bedroom",
    "tell me a funny story",
    "open the front door",
    "what is the capital of france",
    "switch off the radio",
    "read me the latest news",
]
# Different voices are different speakers to a speaker encoder.
VOICES = ["en", "en+f3", "en+m7", "en-us+f5"]
