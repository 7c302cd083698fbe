"""mkdocs hook: links from a page to files of the repository outside docs/ (protos/, examples/, bench/).

On GitHub those relative links work as they are; the site has no copy of those files, so here a link to a
file that exists becomes a link into the repository (`repo_url`, when mkdocs.yml sets it) or its path as
code, and a link to a file that does not exist is a warning, which --strict turns into a failed build.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.repo_links")
LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    page_folder = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        path = (docs / page_folder / target).resolve()
        if docs in path.parents or path == docs:
            return match.group(0)  # a page of the site: mkdocs checks it
        if repo not in path.parents or not path.exists():
            log.warning("%s: link to %r, which is not a file of the repository", page.file.src_uri, target)
            return match.group(0)
        relative = path.relative_to(repo).as_posix()
        if config.get("repo_url"):
            kind = "tree" if path.is_dir() else "blob"
            return f"[{text}]({config['repo_url'].rstrip('/')}/{kind}/main/{relative}{anchor})"
        return text if text.startswith("`") else f"{text} (`{relative}`)"

    return LINK.sub(rewrite, markdown)
