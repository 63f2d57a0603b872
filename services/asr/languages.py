"""Language codes as callers write them, and Chinese text in simplified characters.

Whisper learned Chinese from transcripts in both scripts, so left alone it
answers now in simplified, now in traditional characters (1 of 16 Opus-coded
cuts of the Mandarin test recording came back traditional). OpenCC's
traditional-to-simplified conversion is applied to Chinese transcripts.

The other remedy, a simplified-Mandarin previous-text prompt
("以下是普通话的句子。"), was measured and left out: through the device
path it gave a CER of 0.099 over 8 runs against 0.072 without, and once
answered with the prompt itself ("这次是普通话的句子。") instead of the speech.
"""

from __future__ import annotations

import re
import threading

from opencc import OpenCC

AUTO = "auto"

# Codes devices and operators write for Chinese that Whisper knows as "zh".
_ALIASES = {"cmn": "zh", "chinese": "zh", "mandarin": "zh", "english": "en"}
_CODE = re.compile(r"^[a-z]{2,3}$")


def normalize_language(code: str) -> str:
    """``"auto"`` or the primary subtag of a language tag: ``zh-CN`` -> ``zh``, ``EN_us`` -> ``en``.

    Anything that is not a language tag (empty, ``"*"``, ``"detect"``) means
    automatic detection.
    """
    primary = re.split(r"[-_]", code.strip().lower(), maxsplit=1)[0]
    primary = _ALIASES.get(primary, primary)
    return primary if _CODE.match(primary) else AUTO


class SimplifiedChinese:
    """Traditional characters to simplified ones, for Chinese transcripts.

    OpenCC's ``t2s`` converts character by character and phrase by phrase;
    text already simplified, and anything not Chinese, comes back unchanged.
    The converter is built on first use and shared; OpenCC converters keep
    no state between calls, the lock only guards building it.
    """

    _converter: OpenCC | None = None
    _lock = threading.Lock()

    @classmethod
    def convert(cls, text: str) -> str:
        if not text:
            return text
        if cls._converter is None:
            with cls._lock:
                if cls._converter is None:
                    cls._converter = OpenCC("t2s")
        return str(cls._converter.convert(text))
