"""MkDocs hook: publish the Jupyter lessons, which live in ``lessons/`` beside ``docs/``.

The notebooks stay where ``pytest`` (nbmake) executes them. This hook adds every
``lessons/*.ipynb`` to the site's files under the same path, so a nav entry such as
``lessons/01_from_weights_to_text.ipynb`` finds it and mkdocs-jupyter renders it as a
page (with ``execute: false``: the docs build never runs a notebook). ``mkdocs serve``
also watches ``lessons/`` so an edited notebook reloads.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

LESSONS_DIR = "lessons"


def _lessons_dir(config) -> Path:
    return Path(config.config_file_path).resolve().parent / LESSONS_DIR


@event_priority(100)  # before mkdocs-jupyter's on_files turns .ipynb files into pages
def on_files(files: Files, config) -> Files:
    root = _lessons_dir(config).parent
    for notebook in sorted(_lessons_dir(config).glob("*.ipynb")):
        src_path = f"{LESSONS_DIR}/{notebook.name}"
        if files.get_file_from_path(src_path) is None:
            files.append(File(src_path, src_dir=str(root), dest_dir=config.site_dir,
                              use_directory_urls=config.use_directory_urls))
    return files


def on_serve(server, config, builder):
    if _lessons_dir(config).is_dir():
        server.watch(str(_lessons_dir(config)))
    return server
