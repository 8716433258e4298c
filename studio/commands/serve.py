"""studio serve: the studio in the browser (Gradio), on 127.0.0.1 unless told otherwise.

--host/--port default to Gradio's own GRADIO_SERVER_NAME/GRADIO_SERVER_PORT (what hosting platforms such
as Spaces set), then the older STUDIO_HOST/STUDIO_PORT, then 127.0.0.1:7860.
"""
import os

HOST_ENV = ("GRADIO_SERVER_NAME", "STUDIO_HOST")
PORT_ENV = ("GRADIO_SERVER_PORT", "STUDIO_PORT")


def add_arguments(p):
    p.add_argument("--base", default=os.environ.get("STUDIO_BASE", "embedded"),
                   help="default base model: embedded, embedded-dit or a diffusers folder (env STUDIO_BASE)")
    p.add_argument("--host", default=_from_env(HOST_ENV)[1] or "127.0.0.1",
                   help="address to bind (env GRADIO_SERVER_NAME; default 127.0.0.1: this machine only)")
    # the env port is read and checked in run(), so a bad value is one line and breaks no other command
    p.add_argument("--port", type=int, default=None, help="port (env GRADIO_SERVER_PORT; default 7860)")
    p.add_argument("--home", default=None, help="workspace folder (env STUDIO_HOME, default ~/.diffusion-studio)")
    p.add_argument("--auth", default=os.environ.get("STUDIO_AUTH"),
                   help="user:password required to open the page (env STUDIO_AUTH); advised with --host 0.0.0.0")
    p.add_argument("--max-upload", default="20mb", help="largest accepted upload (default 20mb)")
    p.add_argument("--queue-size", type=int, default=16, help="jobs that may wait in the model queue before it says 'full'")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")


def _from_env(names):
    """(variable, value) of the first of `names` set to something non-empty, else (None, None)."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return None, None


def server_port(port=None) -> int:
    """--port if given, else GRADIO_SERVER_PORT (or STUDIO_PORT), else 7860; must be 1-65535."""
    source, value = ("--port", port) if port is not None else _from_env(PORT_ENV)
    if source is None:
        return 7860
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise ValueError(f"{source} must be a port number from 1 to 65535, got {value!r}")
    return number


def parse_auth(text):
    if not text:
        return None
    user, sep, password = str(text).partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like user:password")
    return (user, password)


def run(args):
    auth = parse_auth(args.auth)
    port = server_port(args.port)
    if args.queue_size < 1:
        raise ValueError("--queue-size must be at least 1")
    from studio.ui import launch

    launch(base=args.base, host=args.host, port=port, home=args.home, auth=auth, max_upload=args.max_upload,
           queue_size=args.queue_size, device=args.device, block=True)
    return 0
