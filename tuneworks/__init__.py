"""The `tuneworks` launcher: the command line, `tuneworks up` and the demo. It may import every process package."""
