"""Tiny source files for the download tests: a MediaWiki dump (bz2) and a tar.gz of 4 task files."""
from __future__ import annotations

import bz2
import copy
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

NS = "http://www.mediawiki.org/xml/export-0.10/"

ALPHA = """{{Infobox thing|name=Alpha|secret=TEMPLATEJUNK}}
'''Alpha''' is the first [[Greek alphabet|letter]] of the [[alphabet]].<ref>REFJUNK citation</ref> It is old.<ref name="x"/>

== History ==
The letter came from [[Phoenicia]].
{| class="wikitable"
| TABLEJUNK || cell
|}
[[File:Alpha.svg|thumb|FILEJUNK caption]]
See [http://example.org the site] &amp; more.<!-- COMMENTJUNK -->
[[Category:CATJUNK]]
[[de:Alpha]]
"""

WIKI_PAGES = [
    # (id, title, ns, redirect, text)
    ("1", "Alpha", "0", False, ALPHA),
    ("2", "Alpha redirect", "0", True, "#REDIRECT [[Alpha]]"),
    ("3", "Talk:Alpha", "1", False, "Talk page text TALKJUNK."),
    ("4", "Beta", "0", False, "'''Beta''' is the second letter. It follows [[Alpha|alpha]]."),
    ("5", "Gamma", "0", False, "Gamma is the third letter of the Greek alphabet."),
    ("6", "Only template", "0", False, "{{Disambiguation}}"),
    ("7", "Delta", "0", False, "Delta is the fourth letter. Rivers have deltas."),
    ("8", "Epsilon", "0", False, "Epsilon is the fifth letter."),
    ("9", "Zeta", "0", False, "Zeta is the sixth letter."),
]


def wiki_xml(pages=WIKI_PAGES) -> bytes:
    from xml.sax.saxutils import escape

    out = [f'<mediawiki xmlns="{NS}" version="0.10" xml:lang="en">',
           "<siteinfo><sitename>Wikipedia</sitename></siteinfo>"]
    for pid, title, ns, redirect, text in pages:
        red = f'<redirect title="{escape(title)}" />' if redirect else ""
        out.append(f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{pid}</id>{red}"
                   f"<revision><id>1{pid}</id><model>wikitext</model>"
                   f'<text xml:space="preserve">{escape(text)}</text></revision></page>')
    out.append("</mediawiki>")
    return "\n".join(out).encode("utf-8")


def task_files() -> dict[str, bytes]:
    """name -> CRLF bytes; amazon/nyt ids are document_sentence."""
    def rows(lines):
        return "\r\n".join(lines).encode("utf-8")

    ratings = [2.5, -2.0, 0.2, 1.5, -3.1, -0.1, 3.0, -1.0]
    movies = [f"{i}\t{ratings[i % 8]}\tmovie sentence {i} was {'great' if ratings[i % 8] > 0 else 'bad'}"
              for i in range(1, 41)]
    amazon = [f"{d}_{s}\t{ratings[(d + s) % 8]}\tamazon review {d} sentence {s}"
              for d in range(1, 13) for s in range(1, 4)]
    nyt = [f"{d}_{s}\t{ratings[(d * 3 + s) % 8]}\tnyt editorial {d} sentence {s}"
           for d in range(1, 13) for s in range(1, 3)]
    tweets = [f"{i}\t{ratings[(i * 5) % 8]}\ttweet number {i} &amp; more" for i in range(1, 31)]
    return {"movies": rows(movies), "amazon": rows(amazon), "nyt": rows(nyt), "tweets": rows(tweets)}


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz",
             links: dict[str, tuple[bytes, str]] | None = None) -> Path:
    """A tar with regular members and optional links {name: (tarfile.SYMTYPE|LNKTYPE, target)}."""
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            tf.addfile(ti, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.linkname = target
            tf.addfile(ti)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_sources(d: Path) -> dict[str, Any]:
    """Write dump.xml.bz2 and tasks.tar.gz under `d`; return a valid `download` params dict."""
    d.mkdir(parents=True, exist_ok=True)
    dump = bz2.compress(wiki_xml())
    (d / "dump.xml.bz2").write_bytes(dump)
    files = task_files()
    tar_path = make_tar(d / "tasks.tar.gz", {f"hutto/{k}.txt": v for k, v in files.items()})
    return {
        "seed": 7,
        "max_bytes": 10_000_000,
        "corpus": {
            "source": {"kind": "file", "path": str(d / "dump.xml.bz2"), "sha256": sha(dump)},
            "format": {"kind": "mediawiki"},
            "validation_fraction": 0.25,
            "max_articles": None,
            "add_task_text": False,
        },
        "tasks": {
            "source": {"kind": "file", "path": str(tar_path), "sha256": sha(tar_path.read_bytes())},
            "files": {k: {"member": f"hutto/{k}.txt", "sha256": sha(v), **vader_table(k in ("amazon", "nyt"))}
                      for k, v in files.items()},
            "labels": {"polarity": POLARITY, "source": {"kind": "table"}},
            "tasks": {"movies": {"files": ["movies"], "labels": "polarity"},
                      "amazon": {"files": ["amazon"], "labels": "polarity"},
                      "nyt": {"files": ["nyt"], "labels": "polarity"},
                      "tweets": {"files": ["tweets"], "labels": "polarity"},
                      "source": {"files": ["movies", "amazon", "nyt", "tweets"], "labels": "source"}},
            "validation_fraction": 0.2,
            "test_fraction": 0.2,
            "max_train": None,
            "dedup_across_splits": False,
        },
        "foundation": None,
    }


POLARITY = {"kind": "bins", "column": "rating", "range": [-4, 4],
            "classes": {"negative": [-4, -0.5], "positive": [0.5, 4]}}


def vader_table(grouped: bool) -> dict[str, Any]:
    """The table params of a VADER file: `id<TAB>rating<TAB>text`, grouped by document or not."""
    t = {"format": {"kind": "tsv", "columns": ["id", "rating", "text"]}, "text": "text", "id": "id"}
    if grouped:
        t["group"] = {"column": "id", "pattern": r"(\d+)_\d+"}
    return t


def with_(params: dict, dotted: str, value: Any) -> dict:
    """A deep copy of `params` with `a.b.c` set to `value`."""
    out = copy.deepcopy(params)
    *head, last = dotted.split(".")
    node = out
    for k in head:
        node = node[k]
    node[last] = value
    return out
