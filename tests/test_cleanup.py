"""Votes whose answers leak an identity are kept but do not count for the board."""
from study.cleanup import reveals_identity


def test_identity_leaks_are_found_as_whole_words() -> None:
    assert reveals_identity(["As LLaVA, I think the colours work."])
    assert reveals_identity(["fine", "I was trained by OpenAI."])
    assert reveals_identity(["tiny-critic-b says hello"], ["tiny-critic-b"])
    assert not reveals_identity(["The composition is balanced; good lighting."], ["tiny-critic-b"])
    assert not reveals_identity(["a llama-shaped cloud"]), "a hyphenated compound is a word of its own"
    assert not reveals_identity(["gptx is not a name", "meta-data"])
