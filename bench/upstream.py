"""The benchmarks' upstream: the test suite's fake OpenAI server in its own process.

Models: anything echoes at once; ``stream-N`` streams N pieces with no delay;
``slow-2s`` answers after two seconds; ``drip-40`` streams 40 pieces 0.1 s apart.
"""

from __future__ import annotations

import sys
import time

from tests.support.fake_upstream import FakeUpstream, Reply

__all__ = ["main"]


def main() -> None:
    port = int(sys.argv[1])
    upstream = FakeUpstream(port=port, record=False).start()
    for pieces in (10, 100, 500):
        upstream.script(f"stream-{pieces}", Reply(pieces=[f"t{i} " for i in range(pieces)]))
    upstream.script("slow-2s", Reply(delay=2.0, pieces=["slow ", "answer"]))
    upstream.script("drip-40", Reply(pieces=[f"d{i} " for i in range(40)], chunk_delay=0.1))
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
