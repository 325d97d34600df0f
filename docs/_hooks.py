"""MkDocs hooks: the site shows the repository's own figures and results, not copies.

- The examples' figures (`examples/images/*.png`) and each benchmark results folder's
  figures are added to the site at their paths in the repository, so that the
  relative links of `examples/README.md` and of `results.md` hold in the pages that
  include them.
- Each `benchmarks/results/<device>/results.md` becomes the page
  `benchmarks/results/<device>/`.
- `<!-- results DEVICE "HEADING" -->` in a page is replaced by the section of that
  device's `results.md` under the `## HEADING...` heading, so that a page can show one
  measured table as the results file has it.
"""

import pathlib
import re

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
_INCLUDE = re.compile(r'<!-- results (\S+) "([^"]+)" -->')


def on_files(files, config):
    figures = [*ROOT.glob("examples/images/*.png"), *RESULTS.glob("*/*.png")]
    for path in sorted(figures):
        uri = path.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    for results in sorted(RESULTS.glob("*/results.md")):
        uri = f"{results.parent.relative_to(ROOT).as_posix()}/index.md"
        files.append(File.generated(config, uri, content=results.read_text()))
    return files


def on_page_markdown(markdown, page, config, files):
    return _INCLUDE.sub(lambda m: _section(*m.groups()), markdown)


def _section(device: str, heading: str) -> str:
    text = (RESULTS / device / "results.md").read_text()
    sections = re.split(r"^(?=## )", text, flags=re.MULTILINE)
    found = [s for s in sections if s.startswith(f"## {heading}")]
    if len(found) != 1:
        raise ValueError(f"{device}/results.md has no single section {heading!r}")
    body = found[0].split("\n", 1)[1].strip()
    return f"{body}\n\n(From `benchmarks/results/{device}/results.md`.)"
