"""Language codes as callers write them, and Chinese text in simplified characters.

Whisper learned Chinese from transcripts in both scripts, so left alone it
answers now in simplified, now in traditional characters. Two things steer
it, and both are used for ``zh``:

- a previous-text prompt in simplified Mandarin, which Whisper continues in
  the same script and register (it also fixed two of the 19 characters of
  the Mandarin test recording, "与您" back to "语音");
- OpenCC's traditional-to-simplified conversion on the text that comes out,
  because a prompt only makes simplified output likely, not certain.
"""

from __future__ import annotations

import re
import threading

from opencc import OpenCC

AUTO = "auto"

# A sentence in the script and register wanted, given to Whisper as text
# that came before ("The following are sentences in Mandarin.").
PREVIOUS_TEXT = {"zh": "以下是普通话的句子。"}

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
