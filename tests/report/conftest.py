import sys
from pathlib import Path

# browser (tests/) is a plain helper module
folder = str(Path(__file__).parent.parent)
if folder not in sys.path:
    sys.path.insert(0, folder)
