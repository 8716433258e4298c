"""studio jobs list|submit|cancel|resume|mark-stopped|worker: the training queue on disk (SQLite + run folders)."""


def add_arguments(p):
    from studio.commands.train import add_config_arguments

    p.add_argument("--home", default=None, help="job store folder (default: $STUDIO_HOME or ~/.diffusion-studio)")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="show every job and its state")
    submit = sub.add_parser("submit", help="queue a training job (the same flags as `studio train`; --out optional)")
    submit.add_argument("--name", default=None, help="a name shown in the list")
    add_config_arguments(submit)
    for action, text in (("cancel", "cancel a queued job, or stop a running one (it checkpoints first)"),
                         ("resume", "requeue a cancelled or failed job; it continues from its last checkpoint"),
                         ("mark-stopped", "mark a job cancelled whose worker is gone")):
        one = sub.add_parser(action, help=text)
        one.add_argument("job", type=int)
    worker = sub.add_parser("worker", help="run queued jobs one at a time")
    worker.add_argument("--until-empty", action="store_true", help="exit when the queue is empty")


def _line(job) -> str:
    progress = f"{job.step}/{job.steps}" if job.steps else "-"
    text = f"{job.id:>4}  {job.state:<9}  {progress:>11}  {job.name:<20}  {job.run_dir}"
    return text + (f"  ({job.error})" if job.error else "")


def run(args):
    from studio.jobs import JobStore, Worker

    store = JobStore(args.home)
    action = getattr(args, "action", None)
    if action in (None, "list"):
        jobs = store.list()
        if not jobs:
            print(f"no jobs in {store.root}")
        for job in jobs:
            print(_line(job))
        return 0
    if action == "submit":
        from studio.commands.train import config_from_args

        settings = config_from_args(args)
        settings.pop("resume", None)
        job = store.submit(settings, name=args.name)
        print(_line(job))
        return 0
    if action == "cancel":
        print(_line(store.cancel(args.job)))
        return 0
    if action == "resume":
        print(_line(store.resume(args.job)))
        return 0
    if action == "mark-stopped":
        print(_line(store.mark_stopped(args.job)))
        return 0
    if action == "worker":
        Worker(store, on_event=None).run_forever(until_empty=args.until_empty)
        return 0
    raise ValueError(f"unknown jobs action {action!r}")
