"""studio serve: the studio in the browser (Gradio), on 127.0.0.1 unless told otherwise."""
import os


def add_arguments(p):
    p.add_argument("--base", default=os.environ.get("STUDIO_BASE", "embedded"),
                   help="default base model: embedded, embedded-dit or a diffusers folder (env STUDIO_BASE)")
    p.add_argument("--host", default=os.environ.get("STUDIO_HOST", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("STUDIO_PORT", "7860")))
    p.add_argument("--home", default=None, help="workspace folder (env STUDIO_HOME, default ~/.diffusion-studio)")
    p.add_argument("--auth", default=os.environ.get("STUDIO_AUTH"),
                   help="user:password required to open the page (env STUDIO_AUTH); advised with --host 0.0.0.0")
    p.add_argument("--max-upload", default="20mb", help="largest accepted upload (default 20mb)")
    p.add_argument("--queue-size", type=int, default=16, help="jobs that may wait in the model queue before it says 'full'")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")


def parse_auth(text):
    if not text:
        return None
    user, sep, password = str(text).partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like user:password")
    return (user, password)


def run(args):
    auth = parse_auth(args.auth)
    if args.queue_size < 1:
        raise ValueError("--queue-size must be at least 1")
    from studio.ui import launch

    launch(base=args.base, host=args.host, port=args.port, home=args.home, auth=auth, max_upload=args.max_upload,
           queue_size=args.queue_size, device=args.device, block=True)
    return 0
