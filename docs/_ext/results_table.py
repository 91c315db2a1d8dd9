"""Measured tables, read from ``benchmarks/results/`` when the docs are built.

Two directives, so that no measured number is typed into a page by hand:

``.. results-table:: NAME``
    Renders the markdown file ``benchmarks/results/NAME.md`` that a benchmark
    script wrote: its pipe tables become ordinary tables, and with ``:text:``
    its headings (as rubrics) and paragraphs come along. Options:

    ``:tables: 1,3``
        Only these tables of the file (1-based, in file order); all by default.
    ``:text:``
        Also render the file's headings and paragraphs (machine, settings).
    ``:command: python benchmarks/...``
        The command that writes the file, shown when it is missing. Known
        names (``latest``, ``speed``, ``ann``, ``gpu``, ``tuning-<study>``,
        ``tuning-selection``) have one already.

``.. anchor-comparison::``
    The package's results of ``benchmarks/results/latest.json`` (the default
    settings only), next to the other implementations' numbers that
    ``benchmarks/run_benchmarks.py`` keeps as ``ANCHORS`` (read from the
    script's source, never imported), one row per data set and coreset ratio.

A file (or a table) that does not exist yet never fails the build: the page
shows a note saying which command writes it. Each page depends on the files it
reads, so Sphinx rebuilds it when a result changes. The folder is the
``results_dir`` setting of ``conf.py``; by default ``../benchmarks/results``
next to the documentation sources.
"""

from __future__ import annotations

import ast
import json
import os
import re

from docutils import nodes
from docutils.parsers.rst import Directive, directives

COMMANDS = {
    "latest": "python benchmarks/run_benchmarks.py",
    "speed": "python benchmarks/speed.py",
    "ann": "python benchmarks/ann.py",
    "gpu": "PYTHONPATH=. python benchmarks/gpu_check.py --out benchmarks/results (on a CUDA machine)",
    # The ranking of every study's variants by the rule, not a study of its own.
    "tuning-selection": "python benchmarks/tune.py --select",
}
METRICS = ("image_auroc", "pixel_auroc", "aupro")

_INLINE = re.compile(r"(`[^`]+`|\*\*[^*]+\*\*)")
_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def default_command(name: str) -> str:
    """The command that writes ``NAME.md``, for the source line and the note shown while it is missing."""
    if name in COMMANDS:
        return COMMANDS[name]
    if name.startswith("tuning-"):
        return f"python benchmarks/tune.py --study {name[len('tuning-') :]}"
    return f"the benchmark script that writes {name}.md"


# -- Markdown (the subset the benchmark scripts write) -------------------------------


def split_row(line: str) -> list[str]:
    """Cells of one pipe-table row; a ``|`` inside backticks or escaped stays in its cell."""
    text = line.strip()
    if text.startswith("|"):
        text = text[1:]
    if text.endswith("|") and not text.endswith("\\|"):
        text = text[:-1]
    cells, current, in_code, index = [], [], False, 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text) and text[index + 1] == "|":
            current.append("|")
            index += 2
            continue
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append("".join(current).strip())
            current = []
        else:
            current.append(char)
        index += 1
    cells.append("".join(current).strip())
    return cells


def parse_markdown(text: str) -> list[tuple]:
    """Blocks of a results file, in order.

    Each block is ``("heading", level, text)``, ``("table", header, rows)``,
    ``("paragraph", text)`` or ``("list", items)``.
    """
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        line = lines[index].rstrip()
        if not line.strip():
            index += 1
        elif line.lstrip().startswith("#"):
            marks = len(line.lstrip()) - len(line.lstrip().lstrip("#"))
            blocks.append(("heading", marks, line.lstrip()[marks:].strip()))
            index += 1
        elif line.lstrip().startswith("|"):
            rows = []
            while index < len(lines) and lines[index].lstrip().startswith("|"):
                rows.append(lines[index])
                index += 1
            if len(rows) >= 2 and _SEPARATOR.match(rows[1].strip()):
                header, body = split_row(rows[0]), [split_row(row) for row in rows[2:]]
            else:
                header, body = None, [split_row(row) for row in rows]
            blocks.append(("table", header, body))
        elif re.match(r"^\s*[-*] ", line):
            items = []
            while index < len(lines) and lines[index].strip():
                item = lines[index].strip()
                if re.match(r"^[-*] ", item):
                    items.append(item[2:].strip())
                elif items:
                    items[-1] += " " + item
                index += 1
            blocks.append(("list", items))
        else:
            paragraph = []
            while (
                index < len(lines)
                and lines[index].strip()
                and not lines[index].lstrip().startswith(("#", "|"))
            ):
                paragraph.append(lines[index].strip())
                index += 1
            blocks.append(("paragraph", " ".join(paragraph)))
    return blocks


def inline(text: str) -> list[nodes.Node]:
    """Text nodes for ``code`` spans, **bold** and plain text; nothing else is markup."""
    result = []
    for part in _INLINE.split(text):
        if not part:
            continue
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            result.append(nodes.literal(part[1:-1], part[1:-1]))
        elif part.startswith("**") and part.endswith("**") and len(part) > 4:
            result.append(nodes.strong(part[2:-2], part[2:-2]))
        else:
            result.append(nodes.Text(part))
    return result


def table_node(header: list[str] | None, rows: list[list[str]]) -> nodes.table:
    """A docutils table; short rows are padded with empty cells."""
    n_columns = max([len(header or [])] + [len(row) for row in rows])
    table = nodes.table(classes=["results-table"])
    # Cells hold settings such as layers=['blocks.2'] and "--" ranges: keep them as written.
    table["support_smartquotes"] = False
    group = nodes.tgroup(cols=n_columns)
    table += group
    for _ in range(n_columns):
        group += nodes.colspec(colwidth=1)

    def row_node(cells):
        row = nodes.row()
        for cell in list(cells) + [""] * (n_columns - len(cells)):
            entry = nodes.entry()
            entry += nodes.paragraph("", "", *inline(cell))
            row += entry
        return row

    if header is not None:
        head = nodes.thead()
        head += row_node(header)
        group += head
    body = nodes.tbody()
    for cells in rows:
        body += row_node(cells)
    group += body
    return table


def missing_note(title: str, message: str, command: str) -> nodes.admonition:
    note = nodes.admonition(classes=["note", "results-missing"])
    note += nodes.title(title, title)
    text = nodes.paragraph()
    text += nodes.Text(message + " Run ")
    text += nodes.literal(command, command)
    text += nodes.Text(" from the repository root to measure it; this page shows it from the next build on.")
    note += text
    return note


def source_line(relative: str, command: str) -> nodes.paragraph:
    line = nodes.paragraph(classes=["results-source"])
    line += nodes.emphasis("", "Source: ")
    line += nodes.literal(relative, relative)
    line += nodes.Text(", written by ")
    line += nodes.literal(command, command)
    line += nodes.Text(".")
    return line


# -- Directives --------------------------------------------------------------------------


def _results_dir(directive: Directive) -> str:
    env = directive.state.document.settings.env
    folder = env.config.results_dir or os.path.join(env.srcdir, os.pardir, "benchmarks", "results")
    return os.path.normpath(os.path.abspath(folder))


def _indices(argument: str) -> list[int]:
    try:
        values = [int(part) for part in argument.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"expected table numbers such as '1' or '1,3'; got {argument!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"table numbers start at 1; got {argument!r}")
    return values


class ResultsTable(Directive):
    required_arguments = 1
    has_content = False
    option_spec = {"tables": _indices, "text": directives.flag, "command": directives.unchanged}

    def run(self):
        name = self.arguments[0]
        if not re.fullmatch(r"[\w.-]+", name):
            raise self.error(f"results-table: {name!r} is not a results file name (e.g. 'tuning-geometry').")
        command = self.options.get("command") or default_command(name)
        relative = f"benchmarks/results/{name}.md"
        path = os.path.join(_results_dir(self), f"{name}.md")
        self.state.document.settings.env.note_dependency(path)
        if not os.path.isfile(path):
            return [missing_note("Not measured yet", f"{relative} does not exist yet.", command)]
        with open(path, encoding="utf-8") as stream:
            blocks = parse_markdown(stream.read())
        tables = [block for block in blocks if block[0] == "table"]
        wanted = self.options.get("tables", list(range(1, len(tables) + 1)))
        absent = [number for number in wanted if number > len(tables)]
        output: list[nodes.Node] = []
        if "text" in self.options:
            number = 0
            for block in blocks:
                if block[0] == "table":
                    number += 1
                    if number in wanted:
                        output.append(table_node(block[1], block[2]))
                elif block[0] == "heading":
                    output.append(nodes.rubric("", "", *inline(block[2])))
                elif block[0] == "paragraph":
                    output.append(nodes.paragraph("", "", *inline(block[1])))
                else:
                    bullets = nodes.bullet_list()
                    for item in block[1]:
                        bullets += nodes.list_item("", nodes.paragraph("", "", *inline(item)))
                    output.append(bullets)
        else:
            output.extend(table_node(*tables[number - 1][1:]) for number in wanted if number <= len(tables))
        if absent:
            shown = ", ".join(str(number) for number in absent)
            output.append(
                missing_note(
                    "Not measured yet",
                    f"{relative} holds {len(tables)} table(s); table {shown} is not there yet "
                    "(the run may still be going).",
                    command,
                )
            )
        output.append(source_line(relative, command))
        return output


def read_constants(script: str, names: tuple[str, ...]) -> dict:
    """Module-level literals of a script (e.g. ``ANCHORS``), read from its source without importing it.

    In a dict, an entry whose value is not a plain literal (it names another
    constant) is kept as None; any other value that is not a literal is left out.
    """
    with open(script, encoding="utf-8") as stream:
        tree = ast.parse(stream.read())
    found = {}
    for statement in tree.body:
        target = getattr(statement, "target", None) or (getattr(statement, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id in names and statement.value is not None:
            try:
                found[target.id] = ast.literal_eval(statement.value)
            except ValueError:
                if isinstance(statement.value, ast.Dict):
                    found[target.id] = {
                        ast.literal_eval(key): _literal_or_none(value)
                        for key, value in zip(statement.value.keys, statement.value.values)
                    }
    return found


def _literal_or_none(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _geometry(features: dict) -> str:
    """``"256 / 224 px"`` or ``"320 px letterbox"`` from feature settings (``image_size``, ...)."""
    size, crop = features.get("image_size"), features.get("crop_size")
    side = features.get("resize_side", "shorter")
    if crop == "auto":
        return f"letterbox of about {size} x {size} px shaped like the training images"
    if side == "longer" and isinstance(size, int) and crop == size:
        return f"{size} px letterbox"
    return f"{size} / {crop} px" + (", longer side" if side == "longer" else "")


class AnchorComparison(Directive):
    has_content = False
    option_spec = {"name": directives.unchanged}

    def run(self):
        env = self.state.document.settings.env
        name = self.options.get("name", "latest")
        folder = _results_dir(self)
        script = os.path.normpath(os.path.join(folder, os.pardir, "run_benchmarks.py"))
        results_path = os.path.join(folder, f"{name}.json")
        env.note_dependency(results_path)
        env.note_dependency(script)
        command = default_command(name)
        try:
            constants = read_constants(script, ("ANCHORS", "ANCHOR_GEOMETRY"))
            anchors = constants["ANCHORS"]
        except (OSError, SyntaxError, KeyError) as error:
            return [missing_note("Anchors not found", f"benchmarks/run_benchmarks.py: {error!r}.", command)]
        ours, our_geometry = {}, None
        if os.path.isfile(results_path):
            with open(results_path, encoding="utf-8") as stream:
                for result in json.load(stream).get("results", []):
                    if result.get("settings") or "error" in result or result.get("quick"):
                        continue  # only the package defaults, full runs
                    key = (result["category"], round(float(result["ratio"]), 6))
                    ours[key] = " / ".join(f"{result[metric]:.3f}" for metric in METRICS)
                    our_geometry = _geometry(result.get("params", {}).get("features", {}))
        names = list(dict.fromkeys(anchor for per_key in anchors.values() for anchor in per_key))
        ours_label = "skpatchcore, defaults" + (f" ({our_geometry})" if our_geometry else "")
        their_geometry = constants.get("ANCHOR_GEOMETRY")
        suffix = f" ({_geometry(their_geometry)})" if isinstance(their_geometry, dict) else ""
        header = ["data set", "coreset", ours_label, *(name + suffix for name in names)]
        rows = []
        for (category, ratio), per_key in anchors.items():
            measured = ours.get((category, round(float(ratio), 6)), "not measured yet")
            cells = [category, f"{100 * ratio:g} %", measured]
            cells += [" / ".join(f"{v:.3f}" for v in per_key[n]) if n in per_key else "" for n in names]
            rows.append(cells)
        output: list[nodes.Node] = [table_node(header, rows)]
        if not ours:
            output.append(
                missing_note(
                    "Not measured yet",
                    f"benchmarks/results/{name}.json has no run with the default settings yet.",
                    command,
                )
            )
        line = nodes.paragraph(classes=["results-source"])
        line += nodes.emphasis("", "Source: ")
        line += nodes.Text("skpatchcore from ")
        line += nodes.literal(f"benchmarks/results/{name}.json", f"benchmarks/results/{name}.json")
        line += nodes.Text("; the other columns are ")
        line += nodes.literal("ANCHORS", "ANCHORS")
        line += nodes.Text(" in ")
        line += nodes.literal("benchmarks/run_benchmarks.py", "benchmarks/run_benchmarks.py")
        line += nodes.Text(". Each cell: image AUROC / pixel AUROC / AUPRO.")
        output.append(line)
        return output


def setup(app):
    app.add_config_value("results_dir", None, "env")
    app.add_directive("results-table", ResultsTable)
    app.add_directive("anchor-comparison", AnchorComparison)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
