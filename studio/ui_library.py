"""Library tab: the adapters on disk (config, method, size, base model); import a LoRA file made elsewhere, export
as LoRA, rename, delete.

Every action is a studio.library function (the same ones `studio library` runs)."""
import json
from dataclasses import dataclass

import gradio as gr

from studio import library
from studio.ui import GPU_LANE, load_libraries, raise_for_ui

COLUMNS = ["name", "method", "rank", "base model", "size", "targets"]


@dataclass
class LibraryTab:
    refresh: object  # refresh(selected=None) -> values for `outputs`
    outputs: list    # the library table, its picker and every adapter picker of the page


def rows(ctx):
    return [[a["name"], a["method"], str(a["rank"]), a["base_model"], a["size"],
             a["targets"] if isinstance(a["targets"], str) else ", ".join(map(str, a["targets"]))]
            for a in library.list_adapters(ctx.home)]


def build(ctx, pickers) -> LibraryTab:
    """`pickers`: the adapter dropdowns of other tabs, refreshed whenever the library changes."""
    from studio.ui_generate import NO_ADAPTER

    gr.Markdown(f"Adapters live in <code>{library.adapters_dir(ctx.home)}</code>, one folder each "
                "(adapter_config.json + adapter_model.safetensors). Trained adapters appear here when their job finishes; "
                "LoRA files from elsewhere (kohya/A1111, diffusers/PEFT, ComfyUI, LyCORIS LoCon .safetensors) come in "
                "through Import.")
    table = gr.Dataframe(headers=COLUMNS, value=rows(ctx), interactive=False, elem_id="lib-table", wrap=True)
    with gr.Row():
        picker = gr.Dropdown(library.adapter_names(ctx.home), label="Adapter", elem_id="lib-picker", scale=2)
        refresh_btn = gr.Button("Refresh", elem_id="lib-refresh", scale=1, size="sm")
    config = gr.Code(label="adapter_config.json", language="json", elem_id="lib-config", interactive=False)
    with gr.Row():
        fmt = gr.Radio(list(library.EXPORT_FORMATS), value="diffusers", label="Export as LoRA", elem_id="lib-export-format")
        export_btn = gr.Button("Export", elem_id="lib-export")
    export_file = gr.File(label="Exported LoRA", elem_id="lib-export-file", interactive=False)
    with gr.Row():
        upload = gr.File(label="Import a LoRA file (.safetensors)", file_types=[".safetensors"],
                         elem_id="lib-import-file", scale=2)
        import_name = gr.Textbox(label="Name (default: the file's)", elem_id="lib-import-name", scale=1)
        import_btn = gr.Button("Import", elem_id="lib-import", scale=1)
    with gr.Row():
        new_name = gr.Textbox(label="New name", elem_id="lib-new-name", scale=2)
        rename_btn = gr.Button("Rename", elem_id="lib-rename", scale=1)
        delete_btn = gr.Button("Delete", variant="stop", elem_id="lib-delete", scale=1)
    status = gr.Markdown(elem_id="lib-status")

    def refresh(selected=None):
        names = library.adapter_names(ctx.home)
        choice = selected if selected in names else (names[0] if names else None)
        picker_choices = [NO_ADAPTER] + names
        return [rows(ctx), gr.update(choices=names, value=choice)] + [gr.update(choices=picker_choices)] * len(pickers)

    def show(name):
        if not name:
            return ""
        try:
            return json.dumps(library.adapter_info(library.adapter_path(name, ctx.home))["config"], indent=2)
        except ValueError:
            return ""

    def export(name, format_):
        try:
            if not name:
                raise ValueError("pick an adapter to export")
            load_libraries()
            path = library.export_adapter(name, format=format_, home=ctx.home)
        except Exception as exc:  # noqa: BLE001
            raise_for_ui(exc)
        return str(path), f"Exported **{name}** as a {format_} LoRA: `{path}`"

    def import_file(file, name):
        try:
            if not file:
                raise ValueError("choose a .safetensors LoRA file to import")
            path = library.import_lora(getattr(file, "name", file), name=str(name or "").strip() or None, home=ctx.home)
        except Exception as exc:  # noqa: BLE001
            raise_for_ui(exc)
        summary = library.adapter_info(path)["config"]["summary"]
        return [f"Imported **{path.name}**: {summary}", None, ""] + refresh(path.name)

    def rename(name, new):
        try:
            if not name:
                raise ValueError("pick an adapter to rename")
            path = library.rename_adapter(name, new, home=ctx.home)
        except Exception as exc:  # noqa: BLE001
            raise_for_ui(exc)
        return [f"Renamed **{name}** to **{path.name}**", ""] + refresh(path.name)

    def delete(name):
        try:
            if not name:
                raise ValueError("pick an adapter to delete")
            library.delete_adapter(name, home=ctx.home)
        except Exception as exc:  # noqa: BLE001
            raise_for_ui(exc)
        return [f"Deleted **{name}**", ""] + refresh()

    outputs = [table, picker] + list(pickers)
    refresh_btn.click(refresh, inputs=[picker], outputs=outputs, queue=False)
    rename_btn.click(rename, inputs=[picker, new_name], outputs=[status, new_name] + outputs, queue=False)
    import_btn.click(import_file, inputs=[upload, import_name], outputs=[status, upload, import_name] + outputs, queue=False)
    delete_btn.click(delete, inputs=[picker], outputs=[status, config] + outputs, queue=False)
    picker.change(show, inputs=[picker], outputs=[config], queue=False)
    export_btn.click(export, inputs=[picker, fmt], outputs=[export_file, status], concurrency_id=GPU_LANE, concurrency_limit=1)
    return LibraryTab(refresh=refresh, outputs=outputs)
