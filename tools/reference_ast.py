"""Reading statements out of a reference training script without running it: the shared part of the golden-data
tools that execute flow_grpo's loss code unchanged (``flow_grpo_dpo_reference.py``, ``flow_grpo_train_reference.py``).

Both scripts compute their loss inside one ``with accelerator.accumulate(transformer):`` block and end it with
``accelerator.backward(loss)``; the tools run the statements before that call on tiny seeded inputs. A layout these
functions do not find exits with a message naming the file, so a tool pointed at another commit fails loudly instead
of extracting the wrong statements.
"""

from __future__ import annotations

import ast

ACCUMULATE = "accelerator.accumulate(transformer)"
BACKWARD = "accelerator.backward(loss)"


def function_source(source: str, name: str, file: str) -> str:
    """The source text of the (first) function ``name`` defined anywhere in ``source``."""
    fn = next((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if fn is None:
        raise SystemExit(f"{file} defines no function {name}: another commit's layout")
    return ast.get_source_segment(source, fn)


def accumulate_body(source: str, file: str) -> list[ast.stmt]:
    """The statements of the one ``with accelerator.accumulate(transformer):`` block of ``source``."""
    blocks = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.With)
              and ast.unparse(n.items[0].context_expr) == ACCUMULATE]
    if len(blocks) != 1:
        raise SystemExit(f"expected one accumulate block in {file}, found {len(blocks)}: another commit's layout")
    return blocks[0].body


def before_backward(body: list[ast.stmt], file: str) -> str:
    """The statements of ``body`` before ``accelerator.backward(loss)``, unparsed one per line."""
    end = next((i for i, n in enumerate(body)
                if isinstance(n, ast.Expr) and ast.unparse(n.value) == BACKWARD), None)
    if end is None:
        raise SystemExit(f"the accumulate block of {file} never calls {BACKWARD}: another commit's layout")
    return "\n".join(ast.unparse(n) for n in body[:end])
