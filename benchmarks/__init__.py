"""Benchmarks: does sinkwatch run at the speed of its codecs?

``python -m benchmarks`` (``--quick`` for a short run, ``--out FILE`` for the
JSON) builds a corpus from the real photographs of the test extra, then
measures in one run, on this machine:

- per image, single thread: every stage of the real runner, and the *floor*
  (decode + resize + encode of the two outputs, nothing else);
- the same job done by an ImageMagick ``convert`` command and by a naive
  Pillow script (the peers);
- a real daemon subprocess: throughput with 1 and 2 workers, latency at a
  steady rate, RSS and open files over a long backlog;
- codec alternatives (what faster decoders and encoders would buy).

Every comparison is a ratio of numbers measured in the same run; absolute
times depend on the machine and on what else runs on it.
"""
