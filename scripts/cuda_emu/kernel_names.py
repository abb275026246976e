"""Prints the names of the `extern "C"` functions returning void (the kernels) defined in a
preprocessed kernel file (stdin, with line markers; argv[1]: its name): both `extern "C" void name(` and the top level of
`extern "C" { ... }` blocks. Used by build.sh to register each kernel with the fake driver."""
import re
import sys

# Only the text of the kernel file itself (argv[1]), by the preprocessor's line markers: the
# headers it includes declare C functions too.
main, keep, lines = sys.argv[1], False, []
for line in sys.stdin.read().split("\n"):
    m = re.match(r'# \d+ "([^"]*)"', line)
    if m:
        keep = m.group(1).endswith(main)
    elif keep:
        lines.append(line)
src = "\n".join(lines)
names = set(re.findall(r'extern\s+"C"\s+void\s+(\w+)\s*\(', src))
for m in re.finditer(r'extern\s+"C"\s*\{', src):
    i, depth = m.end(), 1
    while depth and i < len(src):
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
    block = src[m.end():i - 1]
    # Keep only depth-0 text of the block (function signatures), dropping bodies.
    top, d = [], 0
    for ch in block:
        if ch == "{":
            d += 1
            if d == 1:
                top.append(";")
        elif ch == "}":
            d -= 1
        elif d == 0:
            top.append(ch)
    names |= set(re.findall(r'(?:^|[;\s])void\s+(\w+)\s*\(', "".join(top)))
for n in sorted(names):
    print(n)
