"""Griffe extension for the API reference: make minibatch's docstrings read well as Markdown.

minibatch's docstrings are plain text with reStructuredText-style roles
(:class:`ModelConfig`, :meth:`from_hf`), and its dataclasses document their fields
with a trailing comment (``top_k: int = 0  # 0 or -1: all tokens``). This extension,
loaded by mkdocstrings (``extensions:`` in mkdocs.yml), does two things once the
package is loaded:

* turns each role into a cross-reference when its target is found in the package, or
  into inline code when it is not. The reference is *optional*: when the target is
  not rendered anywhere in the site it shows as code, never as a broken-link warning,
  so ``mkdocs build --strict`` does not depend on which objects have pages;
* gives a one-line attribute without a docstring its trailing comment as docstring
  (a leading shape such as ``[N, H]`` set as code).
"""

from __future__ import annotations

import io
import re
import tokenize
from typing import Any

import griffe

SHAPE = re.compile(r"^(\[[^\]]*\])\s*(.*)$")
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj):`(~?)([^`]+)`")


class MinibatchDocstrings(griffe.Extension):
    """Rewrite roles as cross-references; document fields from trailing comments."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None or attr.lineno != attr.endlineno:
            return
        comment = _trailing_comment(attr.lines[0] if attr.lines else "")
        if comment:
            attr.docstring = griffe.Docstring(comment, lineno=attr.lineno, endlineno=attr.lineno, parent=attr)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = _rewrite_roles(obj.docstring.value, obj, loader)


def _rewrite_roles(text: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
    return ROLE.sub(lambda match: _reference(match, obj, loader), text)


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _reference(match: re.Match, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
    shorten, target = match.group(1), match.group(2).strip()
    title = target.rsplit(".", 1)[-1] if shorten else target
    path = _resolve(target, obj, loader)
    if path is None:
        return f"`{title}`"
    return f'<autoref optional identifier="{path}"><code>{title}</code></autoref>'


def _resolve(target: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str | None:
    """The canonical path of ``target`` as seen from ``obj``: its own members first, then
    its parents' (class, module, package), then an absolute path."""
    scope: griffe.Object | None = obj
    while scope is not None:
        found = _lookup(scope, target)
        if found is not None:
            return found
        scope = scope.parent
    try:
        return _canonical(loader.modules_collection[target])
    except (KeyError, ValueError, griffe.GriffeError):
        return None


def _lookup(scope: griffe.Object, target: str) -> str | None:
    try:
        return _canonical(scope[target])
    except (KeyError, ValueError, griffe.GriffeError):
        return None


def _canonical(member: Any) -> str | None:
    if getattr(member, "is_alias", False):
        try:
            return member.final_target.path
        except griffe.GriffeError:
            return member.target_path
    return member.path


def _trailing_comment(line: str) -> str | None:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    comments = [token.string.lstrip("#").strip() for token in tokens if token.type == tokenize.COMMENT]
    if not comments or not comments[-1] or comments[-1].startswith(("noqa", "type:", "pragma")):
        return None
    shape = SHAPE.match(comments[-1])  # a leading shape like [N, H] reads best as code
    return f"`{shape.group(1)}` {shape.group(2)}".strip() if shape else comments[-1]
