"""studio eval: prompt accuracy and FD-classifier (a stand-in for FID) of a base model, with an optional adapter."""


def add_arguments(p):
    p.add_argument("--base", default="embedded", help="embedded, embedded-dit or a diffusers folder")
    p.add_argument("--adapter", default=None, help="an adapter folder to load onto the base")
    p.add_argument("--per-class", type=int, default=20, help="images generated per class prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's studio.json")
    p.add_argument("--scheduler", default="default", help="default, ddim, euler, unipc, dpm++")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--json", default=None, help="write the full result here")


def run(args):
    import sys

    from studio.evaluate import evaluate_base
    from studio.files import write_json

    def progress(done, total, name, accuracy):
        print(f"  [{done}/{total}] {name}: {accuracy:.2f}", file=sys.stderr)

    result = evaluate_base(args.base, adapter=args.adapter, per_class=args.per_class, steps=args.steps,
                           guidance=args.guidance, scheduler=args.scheduler, seed=args.seed, device=args.device,
                           progress=progress)
    print(f"base {result['base']}  steps {result['steps']}  guidance {result['guidance']}  scheduler {result['scheduler']}")
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:<11} {acc:.2f}" + ("  (held out of pretraining)" if name == result["held_out_class"] else ""))
    print(f"prompt accuracy (pretrained classes): {result['prompt_accuracy']:.3f}")
    print(f"held-out '{result['held_out_class']}' accuracy: {result['held_out_accuracy']}")
    print(f"FD-classifier (stand-in for FID): generated {result['fd']:.2f}  real-vs-real {result['fd_real']:.2f}  "
          f"noise {result['fd_noise']:.2f}")
    print(f"evaluator accuracy on the real test split: {result['evaluator_test_accuracy']:.3f}")
    if args.json:
        write_json(args.json, result)
    return 0
