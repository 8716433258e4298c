"""python app.py: the Diffusion Studio in the browser, on the embedded model, at http://127.0.0.1:7860
(or at GRADIO_SERVER_NAME:GRADIO_SERVER_PORT when those are set, as on Hugging Face Spaces).

Same options as `studio serve` (python app.py --help): --base, --host, --port, --home, --auth, ...
"""
import sys

from studio.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
