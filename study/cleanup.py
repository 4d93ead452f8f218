"""Arena clean-up rules that decide whether a stored vote counts for the public board."""
from __future__ import annotations

import re
from collections.abc import Iterable

# Names that reveal who answered (Chatbot Arena drops votes whose outputs leak an identity).
IDENTITY_NAMES = ("aesexpert", "aesmmit", "llava", "artgpt", "minigpt", "vicuna", "llama", "qwen", "gpt", "chatgpt",
                  "openai", "claude", "anthropic", "gemini", "google", "meta ai", "mistral", "blip", "q-align")


def reveals_identity(texts: Iterable[str], system_names: Iterable[str] = ()) -> bool:
    """Whether any text names a model, a maker, or one of the battle's systems (whole words, any case)."""
    names = {n.lower() for n in (*IDENTITY_NAMES, *system_names) if n.strip()}
    pattern = re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")(?![\w-])",
                         re.IGNORECASE)
    return any(pattern.search(text or "") for text in texts)
