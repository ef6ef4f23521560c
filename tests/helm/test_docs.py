"""The documentation stays true to the repository: docs/reference.md is what scripts/gen-reference
makes of crds/crds.yaml, and every relative link in the docs points at a file (and heading) that
exists. Run by ./scripts/test-chart."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "gen-reference"
REFERENCE = ROOT / "docs" / "reference.md"


def generate(out):
    subprocess.run([sys.executable, str(GENERATOR), "--output", str(out)], check=True, cwd=ROOT)
    return out.read_text(encoding="utf-8")


def test_reference_matches_the_crds(tmp_path):
    fresh = generate(tmp_path / "reference.md")
    current = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
    assert current == fresh, (
        "docs/reference.md is out of date with crds/crds.yaml: run scripts/gen-reference "
        "(e.g. .venv-tools/bin/python scripts/gen-reference) and commit the result"
    )


def test_reference_is_deterministic(tmp_path):
    assert generate(tmp_path / "a.md") == generate(tmp_path / "b.md")


def test_reference_covers_every_kind_and_field():
    import yaml

    text = REFERENCE.read_text(encoding="utf-8")
    crds = [d for d in yaml.safe_load_all((ROOT / "crds" / "crds.yaml").read_text()) if d]
    assert crds
    for crd in crds:
        kind = crd["spec"]["names"]["kind"]
        assert f"\n## {kind}\n" in text, kind
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for field in spec["properties"]:
            assert f"| `spec.{field}` |" in text, f"{kind}: spec.{field}"


def test_printer_columns_and_selectable_fields_name_schema_fields():
    import yaml

    crds = [d for d in yaml.safe_load_all((ROOT / "crds" / "crds.yaml").read_text()) if d]
    for crd in crds:
        version = crd["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        paths = [c["jsonPath"] for c in version.get("additionalPrinterColumns", [])]
        paths += [f["jsonPath"] for f in version.get("selectableFields", [])]
        for path in paths:
            if path.startswith(".metadata."):
                continue
            node = schema
            for part in path.lstrip(".").split("."):
                node = node.get("properties", {}).get(part)
                assert node is not None, (
                    f"{crd['spec']['names']['kind']}: {path} is not in the schema"
                )


# --- links --------------------------------------------------------------------------------

LINKED_FILES = ["README.md", "CONTRIBUTING.md", "SECURITY.md", "CHANGELOG.md"]


def documents():
    found = sorted((ROOT / "docs").glob("*.md"))
    found += [ROOT / f for f in LINKED_FILES if (ROOT / f).exists()]
    return found


def without_fences(text):
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)


def prose(text):
    """The text without fenced code blocks and code spans (their brackets are not links)."""
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", without_fences(text), flags=re.DOTALL)


def links(text):
    body = prose(text)
    inline = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", body)
    defined = re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", body, flags=re.MULTILINE)
    return inline + defined


def slug(heading):
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """GitHub's heading anchors of a Markdown file (duplicates get -1, -2, ...)."""
    seen = {}
    out = set()
    for line in without_fences(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1).replace("`", ""))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    text = path.read_text(encoding="utf-8")
    out |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return out


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):
            continue  # https:, mailto:, ...
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(
                f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist"
            )
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)
