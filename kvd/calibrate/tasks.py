"""Generated evaluation and calibration texts; nothing is downloaded.

Every generator is a pure function of its seed, so a prompt set is reproducible from ``(kind, seed,
length)``. Sources:

- **generated prose**: sentences from a small grammar over word lists (``prose``); two seeds give
  two disjoint-looking texts, which is how calibration and evaluation are kept apart;
- **project docs**: the repo's own Markdown (``project_docs``) and, when present beside the checkout,
  the shared reference docs;
- **Python docstrings**: module and class docstrings of a fixed list of standard-library modules
  (``stdlib_docs``), natural technical English that ships with the interpreter;
- **passkey**: a 5-digit number stated once at a random depth in generated prose, asked at the end;
- **multi-key needle**: several ``name → code`` facts at random depths, one of them asked.

Hold-out rule (decided here, used by the profiler and the benchmark): calibration uses seeds
``< 1000`` and the stdlib docstrings; evaluation uses seeds ``≥ 1000`` and the project docs.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from pathlib import Path

from kvd.core.errors import InvalidRequest

EVAL_SEED_BASE = 1000  # evaluation seeds are ≥ this; calibration seeds below it

_SUBJ = ["the harbor master", "a retired engineer", "the city council", "our neighbour", "the old ferry",
         "a small bakery", "the night shift", "the library committee", "a travelling musician",
         "the weather station", "the village school", "a young botanist", "the railway company",
         "the museum guard", "a fishing crew", "the mountain guide", "the postal clerk", "a stubborn goat"]
_VERB = ["inspected", "repaired", "described", "ignored", "painted", "measured", "carried", "discussed",
         "forgot", "rebuilt", "photographed", "sold", "borrowed", "cleaned", "counted", "mapped"]
_OBJ = ["the broken lantern", "a crate of apples", "the northern bridge", "an unfinished letter",
        "the copper kettle", "a map of the coast", "the wooden fence", "three blue umbrellas",
        "the signal tower", "a basket of herbs", "the winter schedule", "an old photograph",
        "the garden wall", "a pair of boots", "the river gauge", "the festival banner"]
_WHEN = ["before dawn", "after the storm", "on a quiet Tuesday", "during the long winter", "at noon",
         "late in the evening", "while the tide was low", "every spring", "without telling anyone",
         "just before the market opened", "as the fog lifted", "on the last day of summer"]
_WHY = ["because the road was flooded", "so that the children could see it", "although nobody asked",
        "since the budget had finally arrived", "to settle an old argument", "for reasons that remain unclear",
        "after a heated debate", "as everyone had expected", "despite the cold wind"]
_LINK = ["Later,", "Meanwhile,", "For a while,", "In the end,", "Some said that", "Nobody knows why",
         "Soon afterwards,", "By then,", "Oddly enough,", "As a result,"]
_NAMES = ["Alice", "Bruno", "Chen", "Dagny", "Emeka", "Farah", "Goran", "Hana", "Ines", "Jonas", "Kofi",
          "Leila", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Ulla", "Viktor"]

# Standard-library modules whose docstrings form the calibration's natural text (never evaluated).
_STDLIB = ["argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser",
           "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "fractions",
           "functools", "http.client", "http.server", "inspect", "ipaddress", "json", "logging", "mailbox",
           "multiprocessing", "pathlib", "pickle", "pydoc", "queue", "random", "sched", "secrets",
           "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
           "threading", "timeit", "typing", "unittest", "urllib.parse", "uuid", "warnings", "zipfile"]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_WHEN)}"
    if rng.random() < 0.5:
        s += f" {rng.choice(_WHY)}"
    if rng.random() < 0.35:
        s = f"{rng.choice(_LINK)} {s}"
    return s[0].upper() + s[1:] + "."


def prose(seed: int, num_words: int) -> str:
    """Generated prose of about ``num_words`` words, in paragraphs of 3-7 sentences."""
    rng = random.Random(seed)
    paras, words = [], 0
    while words < num_words:
        para = " ".join(_sentence(rng) for _ in range(rng.randint(3, 7)))
        paras.append(para)
        words += len(para.split())
    return "\n\n".join(paras)


def stdlib_docs() -> str:
    """Docstrings of a fixed list of standard-library modules and their public classes."""
    parts = []
    for name in _STDLIB:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if mod.__doc__:
            parts.append(mod.__doc__.strip())
        for attr in sorted(getattr(mod, "__all__", []) or [])[:12]:
            doc = getattr(getattr(mod, attr, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def project_docs(repo_root: Path | None = None) -> str:
    """The project's own Markdown: repo docs, and the shared reference docs when they are beside it."""
    root = repo_root or Path(__file__).resolve().parents[2]
    files = sorted(root.glob("*.md")) + sorted((root / "docs").glob("*.md"))
    for shared in (root.parent / "shared", root / "shared"):
        files += sorted(shared.glob("*.md")) + sorted((shared / "reference").glob("*.md"))
    return "\n\n".join(p.read_text(errors="replace") for p in files if p.is_file())


@dataclass(slots=True, frozen=True)
class RecallPrompt:
    """A prompt whose continuation is ``answer``; scored by greedy decoding of the answer tokens."""

    kind: str
    seed: int
    prompt: str
    answer: str  # begins with a space: " 68512"
    depth: float
    facts: tuple[tuple[str, str], ...] = ()  # multikey: every (name, code) hidden in the prompt


def _fill_to(tok, text_words: list[str], num_tokens: int) -> list[str]:
    """Cut a word list so its text is about ``num_tokens`` tokens long."""
    lo, hi = 0, len(text_words)
    while lo < hi:  # largest prefix under the budget
        mid = (lo + hi + 1) // 2
        if len(tok(" ".join(text_words[:mid]))["input_ids"]) <= num_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text_words[:lo]


def _insert_at_depth(rng: random.Random, words: list[str], needle: str) -> tuple[str, float]:
    # Insert at a sentence boundary at a random depth in [5%, 95%].
    target = int(len(words) * rng.uniform(0.05, 0.95))
    ends = [i + 1 for i, w in enumerate(words) if w.endswith(".")] or [len(words)]
    cut = min(ends, key=lambda i: abs(i - target))
    return " ".join(words[:cut] + [needle] + words[cut:]), cut / max(1, len(words))


_REPEAT_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")


def _repeat_filler(num_words: int) -> str:
    n = len(_REPEAT_FILLER.split())
    return (_REPEAT_FILLER * (num_words // n + 1)).strip()


def passkey(tok, seed: int, num_tokens: int, *, filler: str = "repeat", chat: bool = False) -> RecallPrompt:
    """A passkey prompt of about ``num_tokens`` tokens, the needle at a random depth in the filler.

    ``filler="repeat"``: the classic repeated sentences (Mohtashami & Jaggi's format), the one this
    small model can solve with full KV; ``"prose"``: generated prose (harder: full KV mostly fails).
    ``chat``: wrap text and question in the model's chat template, the answer opened by the assistant.
    """
    if num_tokens < 128:
        raise InvalidRequest(f"passkey prompts need ≥ 128 tokens, got {num_tokens}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    head = ("There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and remember it.\n\n")
    tail = "\n\nWhat is the pass key? The pass key is"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."

    def wrap(body: str) -> str:
        if not chat:
            return head + body + tail
        msg = [{"role": "user", "content": head + body + "\n\nWhat is the pass key?"}]
        return tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) + "The pass key is"

    budget = num_tokens - len(tok(wrap(needle))["input_ids"]) - 1
    text = prose(seed * 7 + 1, budget) if filler == "prose" else _repeat_filler(budget)
    words = _fill_to(tok, text.split(), budget)
    body, depth = _insert_at_depth(rng, words, needle)
    return RecallPrompt("passkey", seed, wrap(body), " " + key, depth)


def multikey(tok, seed: int, num_tokens: int, num_keys: int = 6) -> RecallPrompt:
    """Multi-key needle in a haystack: ``num_keys`` facts ``code for NAME is NNNN``, one is asked."""
    rng = random.Random(seed)
    names = rng.sample(_NAMES, num_keys)
    codes = [str(rng.randint(1000, 9999)) for _ in names]
    head = "Below is a long report. Several people were given secret codes; note them.\n\n"
    asked = rng.randrange(num_keys)
    tail = f"\n\nQuestion: what is the secret code for {names[asked]}? The secret code for {names[asked]} is"
    needles = [f"The secret code for {n} is {c}." for n, c in zip(names, codes, strict=True)]
    budget = num_tokens - len(tok(head + tail + " " + " ".join(needles))["input_ids"])
    words = _fill_to(tok, prose(seed * 7 + 3, budget).split(), budget)
    depth = 0.0
    for i, needle in enumerate(needles):
        text, d = _insert_at_depth(rng, words, needle)
        words = text.split()
        if i == asked:
            depth = d
    return RecallPrompt("multikey", seed, head + " ".join(words) + tail, " " + codes[asked], depth,
                        tuple(zip(names, codes, strict=True)))


def natural_text_ids(tok, source: str, seed: int, num_tokens: int) -> list[int]:
    """``num_tokens`` token ids of natural text: ``source`` is ``docs``, ``prose`` or ``stdlib``.

    ``docs``/``stdlib`` take a window starting at a seed-chosen offset; ``prose`` generates text.
    """
    if source == "prose":
        ids = tok(prose(seed, num_tokens))["input_ids"]
    elif source in ("docs", "stdlib"):
        text = project_docs() if source == "docs" else stdlib_docs()
        all_ids = tok(text)["input_ids"]
        if len(all_ids) < num_tokens:
            all_ids = (all_ids * (num_tokens // max(1, len(all_ids)) + 1))
        start = random.Random(seed).randrange(0, len(all_ids) - num_tokens + 1)
        ids = all_ids[start:start + num_tokens]
    else:
        raise InvalidRequest(f"unknown text source {source!r}; use docs, prose or stdlib")
    if len(ids) < num_tokens:
        raise InvalidRequest(f"{source} text gave {len(ids)} tokens, {num_tokens} asked")
    return ids[:num_tokens]


_PLACES = ("river mountain city lantern harbor garden winter summer engine library market bridge tower forest "
           "island village meadow castle valley desert ocean canyon station museum theater school farmer sailor "
           "painter doctor teacher merchant soldier writer builder baker student pilot").split()
_ACTS = "visits builds paints describes remembers crosses guards follows studies finds leaves opens".split()
_ALPHABET_TAIL = "Letters: " + " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + " A B C D E F"


def alphabet_document(seed: int, num_tokens: int, tok) -> list[int]:
    """``num_tokens`` token ids of English-like sentences ending in the alphabet, whose continuation
    the model is sure of. For comparing engines' greedy outputs: vLLM's CPU kernels round differently
    from one process to the next, so outputs are compared where no two tokens are near a tie (free
    text, numbers above all, flips on noise). Used by the vLLM e2e tests and benchmark."""
    rng = random.Random(seed)
    tail = tok.encode(" " + _ALPHABET_TAIL, add_special_tokens=False)
    ids: list[int] = []
    while len(ids) < num_tokens - len(tail):
        a, b, c = rng.sample(_PLACES, 3)
        ids += tok.encode(f"The {a} {rng.choice(_ACTS)} the {b} near the {c}. ", add_special_tokens=False)
    return ids[: num_tokens - len(tail)] + tail
