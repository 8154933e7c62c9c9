"""MediaWiki XML dumps to plain-text articles.

In:  a binary stream of a MediaWiki XML export (already decompressed), e.g. an enwiki
     `pages-articles` dump.
Out: `Page` records streamed with `xml.etree.ElementTree.iterparse` (each element cleared after
     use, so memory does not grow with the dump), and `to_plain_text(wikitext)`: the markup turned
     into plain text with mwparserfromhell: templates, references, tables, comments, math and
     galleries dropped; file/image/category and interlanguage links dropped; other links keep
     their text; headings kept as their title on a line of their own. `tidy(text)` is the
     whitespace cleaning that `to_plain_text` ends with, shared by every corpus format.

Pure helpers, no files and no CLI: `stages.download` drives them.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import mwparserfromhell as mwp
from mwparserfromhell.nodes import (Argument, Comment, ExternalLink, Heading, HTMLEntity, Tag,
                                    Template, Text, Wikilink)
from mwparserfromhell.wikicode import Wikicode

# Tags whose content is not prose.
DROP_TAGS = frozenset({"ref", "references", "table", "math", "chem", "gallery", "timeline",
                       "imagemap", "score", "syntaxhighlight", "source", "graph", "mapframe",
                       "templatedata", "hiero", "inputbox", "categorytree", "noinclude"})
DROP_LINK_NS = frozenset({"file", "image", "category", "media"})
_LANG_PREFIX = re.compile(r"^(?:[a-z]{2,3}(?:-[a-z0-9]{2,8})*|simple)$")
_MAGIC = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0]+")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_PUNCT = re.compile(r" +([,.;:!?])")
_BLANKS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Page:
    id: str
    title: str
    ns: str
    redirect: bool
    text: str


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, name: str) -> str:
    for child in elem:
        if _local(child.tag) == name:
            return child.text or ""
    return ""


def iter_pages(stream: BinaryIO) -> Iterator[Page]:
    """Every <page> of the export, in order. XML errors propagate (`ET.ParseError`)."""
    root = None
    for event, elem in ET.iterparse(stream, events=("start", "end")):
        if event == "start":
            if root is None:
                root = elem
            continue
        if _local(elem.tag) != "page":
            continue
        text, redirect = "", False
        for child in elem:
            name = _local(child.tag)
            if name == "redirect":
                redirect = True
            elif name == "revision":
                text = _child_text(child, "text")
        yield Page(id=_child_text(elem, "id").strip(), title=_child_text(elem, "title").strip(),
                   ns=_child_text(elem, "ns").strip(), redirect=redirect, text=text)
        elem.clear()
        if root is not None:
            root.clear()  # drop the cleared <page> shells too


def is_redirect(page: Page) -> bool:
    return page.redirect or page.text.lstrip()[:9].upper() == "#REDIRECT"


def _link_prefix(title: str) -> str | None:
    if title.startswith(":") or ":" not in title:
        return None
    return title.split(":", 1)[0].strip().lower()


def _plain(code: Wikicode) -> str:
    out: list[str] = []
    for node in code.nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, (Template, Comment, Argument)):
            continue
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag in DROP_TAGS:
                continue
            if tag == "br":
                out.append("\n")
            elif tag == "li" or tag == "dt" or tag == "dd":
                continue  # list markers; the item text follows as Text nodes
            elif node.contents is not None and not node.self_closing:
                out.append(_plain(node.contents))
        elif isinstance(node, Wikilink):
            title = str(node.title).strip()
            prefix = _link_prefix(title)
            if prefix in DROP_LINK_NS:
                continue
            if node.text is None and prefix is not None and _LANG_PREFIX.match(prefix):
                continue  # interlanguage link
            out.append(_plain(node.text) if node.text is not None else _plain(node.title).lstrip(":"))
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                out.append(_plain(node.title))
        elif isinstance(node, Heading):
            out.append("\n" + _plain(node.title).strip() + "\n")  # a paragraph of its own
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
    return "".join(out)


def tidy(text: str, space_before_punct: bool = False) -> str:
    """The cleaning every corpus format shares: runs of spaces, tabs and no-break spaces become
    one space, every line is stripped, three or more line breaks become one blank line, the
    whole is stripped; with `space_before_punct`, spaces before , . ; : ! ? are removed too."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = _SPACES.sub(" ", line).strip()
        if space_before_punct:
            line = _SPACE_PUNCT.sub(r"\1", line)
        lines.append(line)
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def to_plain_text(wikitext: str) -> str:
    """Plain prose of a page's wikitext (deterministic; empty for a page of only markup)."""
    text = _plain(mwp.parse(wikitext))
    text = _MAGIC.sub("", text)
    text = _EMPTY_PARENS.sub("", text)
    return tidy(text, space_before_punct=True)
