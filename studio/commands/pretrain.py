"""studio pretrain: train the embedded models (autoencoder, evaluator, embedded, embedded-dit) from Fashion-MNIST."""


def add_arguments(p):
    p.add_argument("--model", required=True, choices=["autoencoder", "evaluator", "embedded", "embedded-dit", "text-states"],
                   help="what to train (order: autoencoder, evaluator, embedded / embedded-dit); "
                        "text-states writes the MiniLM states of the 11 prompts for a machine without MiniLM")
    p.add_argument("--out", required=True, help="output folder (a diffusers folder for embedded/embedded-dit); "
                                                "a .safetensors file for text-states")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--vae", default=None, help="autoencoder folder for embedded/embedded-dit (default: assets/embedded/vae)")
    p.add_argument("--text-states", default=None, help="precomputed text states (.safetensors) instead of running MiniLM")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (quick checks)")
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST idx .gz files (default: the Debian path)")


def run(args):
    import json

    from studio.pretrain import pretrain, save_text_states

    if args.model == "text-states":
        print(save_text_states(args.out))
        return 0
    report = pretrain(args.model, args.out, steps=args.steps, seed=args.seed, device=args.device, resume=args.resume,
                      data_dir=args.data, vae=args.vae, text_states=args.text_states, batch=args.batch,
                      limit=args.limit)
    print(json.dumps(report, sort_keys=True))
    return 0
