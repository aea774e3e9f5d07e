import sys
from pathlib import Path

# saelens_compat (this folder) and browser (tests/) are plain helper modules
for folder in (Path(__file__).parent, Path(__file__).parent.parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
