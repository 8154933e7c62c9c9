"""ptf/data/wikitext.py: streaming pages out of a dump and markup to plain text."""
import io

from ptf.data.wikitext import is_redirect, iter_pages, to_plain_text
from tests.download_fixtures import wiki_xml


def test_iter_pages_reads_every_page_with_namespace_and_redirect():
    pages = list(iter_pages(io.BytesIO(wiki_xml())))
    assert [p.title for p in pages][:3] == ["Alpha", "Alpha redirect", "Talk:Alpha"]
    assert [p.ns for p in pages][:3] == ["0", "0", "1"]
    assert [is_redirect(p) for p in pages][:3] == [False, True, False]
    assert pages[0].id == "1" and "{{Infobox" in pages[0].text


def test_plain_text_drops_markup_keeps_link_text():
    text = to_plain_text(
        "{{Infobox|x=1}}'''Bold''' and ''it'' [[Target|shown]] [[plain]] [[:Category:Seen|cat link]]"
        "<ref>cite</ref> [[File:x.png|thumb|cap]] [[Category:Hidden]] [[fr:Truc]] (from {{lang|grc|x}})\n"
        "== Head ==\n{|\n| cell\n|}\n* item one\n<math>x^2</math>__NOTOC__ [https://x.org link] &nbsp;end")
    assert text == "Bold and it shown plain cat link (from )\n\nHead\n\nitem one\nlink end"
    assert to_plain_text("{{only template}}") == ""


def test_tidy_is_the_shared_whitespace_cleaning():
    from ptf.data.wikitext import tidy

    raw = "  One \t two\u00a0three ,  four !\r\n\n\n\n   \nFive  \n"
    assert tidy(raw) == "One two three , four !\n\nFive"
    assert tidy(raw, space_before_punct=True) == "One two three, four!\n\nFive"
    assert tidy(" \n\t\n") == ""
