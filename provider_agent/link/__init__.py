"""The coordinator link: frames, the pure session core, its I/O, the lanes the writer drains."""
