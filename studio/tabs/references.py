"""References: the store image_search sees, searched, browsed and edited (validated uploads, captions, removal)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from genevolve.tools.refstore import MAX_BYTES, RefStoreError, clean_caption

from ..html import message
from ..services import Services
from ..tables import REF_HEADERS, column_widths, gallery_items, ref_rows
from . import StudioError, safe


def tab(s: Services) -> None:
    gr.Markdown("The reference store the agent's image_search sees: search it by text, browse, add images with a caption, "
                "edit captions, remove. The FAISS index is updated with every change.")
    status = gr.HTML(elem_id="refs-status")
    with gr.Row():
        query = gr.Textbox(label="Search (text query → nearest captions)", scale=4, elem_id="refs-query")
        k = gr.Slider(1, 24, value=8, step=1, label="Top k")
        search_btn = gr.Button("Search", variant="primary", elem_id="refs-search")
    gallery = gr.Gallery(label="Hits (id · similarity · caption)", columns=8, height=260, elem_id="refs-gallery")
    with gr.Row():
        with gr.Column():
            upload = gr.File(label=f"Add an image (PNG, JPEG, GIF or WebP, at most {MAX_BYTES // (1024 * 1024)} MB)",
                             elem_id="refs-upload")
            caption = gr.Textbox(label="Caption (what image_search matches)", elem_id="refs-caption")
            add_btn = gr.Button("Add to the store", variant="primary", elem_id="refs-add")
        with gr.Column():
            ref_id = gr.Textbox(label="Reference id", elem_id="refs-id")
            new_caption = gr.Textbox(label="New caption", elem_id="refs-new-caption")
            with gr.Row():
                cap_btn = gr.Button("Save caption", elem_id="refs-save-caption")
                confirm = gr.Checkbox(False, label="Yes, remove it")
                rm_btn = gr.Button("Remove", variant="stop", elem_id="refs-remove")
    with gr.Row():
        filt = gr.Textbox(label="Browse: id, caption, entity or variant contains", scale=3, elem_id="refs-filter")
        page = gr.Number(1, precision=0, minimum=1, label="Page")
        browse_btn = gr.Button("Browse", elem_id="refs-browse")
    table = gr.Dataframe(headers=REF_HEADERS, interactive=False, wrap=True, max_height=360, elem_id="refs-table",
                         column_widths=column_widths(REF_HEADERS, {"caption": 420, "entity": 160}))

    @safe(status)
    def search(q, k_):
        hits = s.refs.search(q, int(k_))
        if not hits:
            return {gallery: [], status: message("info", "type a query to search")}
        return {gallery: gallery_items(hits), status: message("info", f"{len(hits)} hits for {q!r}")}

    @safe(status)
    def browse(text, page_):
        page_ = max(int(page_ or 1), 1)
        rows, total = s.refs.browse(text or "", (page_ - 1) * 50, 50)
        return {table: ref_rows(rows), status: message("info", f"page {page_} of {max(1, -(-total // 50))} ({total} references)")}

    @safe(status)
    def add(file, cap):
        if not file:
            raise StudioError("choose an image file to upload first")
        clean_caption(cap)  # a bad caption keeps the chosen file; a bad file is cleared below
        path = Path(file if isinstance(file, str) else file.name)
        try:
            if path.stat().st_size > MAX_BYTES:
                raise RefStoreError(f"the file has {path.stat().st_size / 1e6:.1f} MB; images of at most "
                                    f"{MAX_BYTES // (1024 * 1024)} MB are accepted")
            row = s.refs.add(path.read_bytes(), cap, filename=path.name)
        except RefStoreError as exc:
            return {status: message("err", f"{path.name}: {exc}"), upload: None}
        s.references_changed()
        return {status: message("ok", f"added {row['id']}: {row['title']}"), ref_id: row["id"], upload: None,
                gallery: gallery_items(s.refs.search(row["title"], 8))}

    @safe(status)
    def recaption(rid, cap):
        row = s.refs.set_caption((rid or "").strip(), cap)
        s.references_changed()
        return {status: message("ok", f"{row['id']} is now captioned {row['title']!r}")}

    @safe(status)
    def remove(rid, yes):
        if not yes:
            raise StudioError("tick 'Yes, remove it' first: removing cannot be undone")
        s.refs.remove((rid or "").strip())
        s.references_changed()
        return {status: message("ok", f"removed {rid}"), confirm: False}

    search_btn.click(search, [query, k], [gallery, status])
    query.submit(search, [query, k], [gallery, status])
    browse_btn.click(browse, [filt, page], [table, status])
    add_btn.click(add, [upload, caption], [status, ref_id, upload, gallery])
    cap_btn.click(recaption, [ref_id, new_caption], [status])
    rm_btn.click(remove, [ref_id, confirm], [status, confirm])
