"""Quality, size and speed of a student against its teacher: the same as `lmkd evaluate`.

    python eval/evaluate.py --model runs/student --teacher runs/teacher --data test.jsonl --task translation \
        --output runs/student/eval.json --plot runs/student/eval.png
"""

import sys

from lmkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
