"""Where the time goes, from a py-spy profile in collapsed-stack form.

    py-spy record --format raw --rate 50 -o bench/results/prof.txt -- python bench/learner_overhead.py
    python bench/pyspy_summary.py bench/results/prof.txt --within train_step --top 25

For every function (file:function), the share of samples in which it is on the stack (inclusive) and at the top
of the stack (self). --within keeps only the samples whose stack contains that function, so the shares are of the
time spent inside it (e.g. Learner.train_step, RolloutActor.process).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])  # frames under the checkout are shown relative to it

_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", f"{REPO_ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{match.group('func')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--within", default=None, help="only samples whose stack has a frame containing this text")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    inclusive, self_time, total = Counter(), Counter(), 0
    for line in open(args.profile):
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";")]
        if args.within and not any(args.within in f for f in frames):
            continue
        n = int(count)
        total += n
        for name in set(frames):
            inclusive[name] += n
        self_time[frames[-1]] += n
    if not total:
        raise SystemExit("no samples matched")
    print(f"{total} samples{' within ' + args.within if args.within else ''}")
    print(f"{'incl%':>6} {'self%':>6}  function")
    for name, n in inclusive.most_common(args.top):
        print(f"{100 * n / total:6.1f} {100 * self_time[name] / total:6.1f}  {name}")


if __name__ == "__main__":
    main()
