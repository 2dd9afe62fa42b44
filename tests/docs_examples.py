"""The code examples of the documentation, and how to check what they print.

A guide page's fenced ```python and ```bash blocks run in order, the Python
blocks of a page in one namespace, as a reader would paste them. What an
example prints is written in the page as a comment: after the `print(...)`
on the same line (`print(x.shape)  # (2, 4)`), or as the comment lines just
below it when it is long. Every `print` of a Python block must say what it
prints; `...` stands for any text, and runs of whitespace compare equal, as
in doctest. A bash block's stdout is compared with the trailing comments of
its printing lines (Python's `print(` inside it, or `echo`). A block that
cannot run in a test says so just above its fence:
`<!-- docs-test: skip (why) -->`.
"""

import ast
import dataclasses
import doctest
import io
import re
import tokenize

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b[^>]*-->\s*$")
RUNNABLE = ("python", "bash")
CHECKER = doctest.OutputChecker()
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclasses.dataclass
class Block:
    language: str
    source: str
    line: int  # of the first line of code in the page, 1-based
    skipped: bool


def blocks(text):
    """The fenced code blocks of a Markdown page, in order."""
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append(
            Block(
                language=match.group(1),
                source=match.group(2),
                line=text.count("\n", 0, match.start(2)) + 1,
                skipped=bool(SKIP.search(before)),
            )
        )
    return found


def runnable(text):
    return [b for b in blocks(text) if b.language in RUNNABLE and not b.skipped]


def expected_output(comments, code_lines, end_line):
    """What the code ending on `end_line` (1-based) says it prints: its
    trailing comment, or else the comment lines right below it. `comments`
    and `code_lines` are a block's, from `_comments`."""
    if end_line in comments and end_line in code_lines:
        return comments[end_line]
    below = []
    line = end_line + 1
    while line in comments and line not in code_lines:
        below.append(comments[line])
        line += 1
    return "\n".join(below) if below else None


def _comments(source):
    """{line: comment text} and the set of lines that hold code."""
    comments, code_lines = {}, set()
    layout = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string[1:].strip()
        elif token.type not in layout and token.type != tokenize.ENDMARKER:
            code_lines.update(range(token.start[0], token.end[0] + 1))
    return comments, code_lines


def matches(want, got):
    return CHECKER.check_output(want.strip() + "\n", got.strip() + "\n", OPTIONS)


class PrintCalls(ast.NodeTransformer):
    """Routes every `print(...)` of a block to `__docs_print__(index, ...)`,
    so each call's output can be compared with what the page says."""

    def __init__(self):
        self.end_lines = []  # the last line of each print call, by index

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "print":
            index = len(self.end_lines)
            self.end_lines.append(node.end_lineno)
            node.func = ast.copy_location(ast.Name("__docs_print__", ast.Load()), node)
            node.args.insert(0, ast.copy_location(ast.Constant(index), node))
        return node


def instrument(block, filename):
    """Compiles a Python block with its print calls routed; returns the code
    object and, per print call, (index, expected output or None)."""
    tree = ast.parse(block.source, filename)
    calls = PrintCalls()
    tree = ast.fix_missing_locations(calls.visit(tree))
    comments, code_lines = _comments(block.source)
    expectations = [
        (index, expected_output(comments, code_lines, end))
        for index, end in enumerate(calls.end_lines)
    ]
    ast.increment_lineno(tree, block.line - 1)
    return compile(tree, filename, "exec"), expectations


def bash_expectations(block):
    """A bash block's expected stdout: the trailing `# ...` comments of its
    lines that print (a `print(` of inline Python, or `echo`), in order."""
    expected = []
    for line in block.source.splitlines():
        match = re.search(r"\s#\s?(.*)$", line)
        prints = "print(" in line or line.lstrip().startswith("echo ")
        if match and prints:
            expected.append(match.group(1))
    return "\n".join(expected)
