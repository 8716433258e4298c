"""studio library list|add|import|rename|delete|export: the adapter library in the workspace (the Library tab's functions)."""


def add_arguments(p):
    p.add_argument("--home", default=None, help="workspace folder (env STUDIO_HOME, default ~/.diffusion-studio)")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="every adapter with its method, rank, base model and size")
    add = sub.add_parser("add", help="copy an adapter folder (or a finished run's adapter/) into the library")
    add.add_argument("folder")
    add.add_argument("--name", required=True)
    imp = sub.add_parser("import", help="copy a LoRA file made elsewhere into the library (kohya/A1111, diffusers/PEFT, "
                                        "ComfyUI or LyCORIS LoCon .safetensors)")
    imp.add_argument("file", help="a .safetensors file, or a folder with pytorch_lora_weights.safetensors")
    imp.add_argument("--name", default=None, help="library name (default: the file's name)")
    rename = sub.add_parser("rename", help="rename an adapter")
    rename.add_argument("name")
    rename.add_argument("new_name")
    delete = sub.add_parser("delete", help="delete an adapter")
    delete.add_argument("name")
    export = sub.add_parser("export", help="write an adapter as a plain LoRA (diffusers or kohya keys)")
    export.add_argument("name")
    export.add_argument("--format", default="diffusers", choices=["diffusers", "kohya"])
    export.add_argument("--out", default=None, help="file to write (default: <home>/exports/<name>-<format>.safetensors)")
    export.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the adapter's rank)")
    export.add_argument("--base", default=None, help="base model to attach to (default: the adapter's own)")
    export.add_argument("--device", default=None)


def run(args):
    from pathlib import Path

    from studio import library

    action = getattr(args, "action", None)
    if action in (None, "list"):
        adapters = library.list_adapters(args.home)
        if not adapters:
            print(f"no adapters in {library.adapters_dir(args.home)}")
        for a in adapters:
            print(f"{a['name']:<24} {a['method']:<6} r={str(a['rank']):<4} {a['size']:>9}  base {a['base_model']}"
                  + ("  (one-step)" if a["one_step"] else ""))
        return 0
    if action == "add":
        folder = Path(args.folder)
        if not library.is_adapter_dir(folder) and library.is_adapter_dir(folder / "adapter"):
            folder = folder / "adapter"
        print(library.add_adapter(folder, args.name, home=args.home))
        return 0
    if action == "import":
        path = library.import_lora(args.file, name=args.name, home=args.home)
        print(f"{path}  ({library.adapter_info(path)['config']['summary']})")
        return 0
    if action == "rename":
        print(library.rename_adapter(args.name, args.new_name, home=args.home))
        return 0
    if action == "delete":
        library.delete_adapter(args.name, home=args.home)
        return 0
    if action == "export":
        print(library.export_adapter(args.name, format=args.format, out=args.out, home=args.home, rank=args.rank,
                                     base=args.base, device=args.device))
        return 0
    raise ValueError(f"unknown library action {action!r}")
