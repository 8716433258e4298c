"""One module per `studio` sub-command: add_arguments(parser) and run(args). Keep imports inside run()."""
