import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.tree import DraftTree


@st.composite
def trees(draw, max_nodes=12):
    n = draw(st.integers(1, max_nodes))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    return DraftTree(torch.tensor(tokens), torch.tensor(parents))


def _depth_by_walking(parents: list[int], i: int) -> int:
    depth = 0
    while i != -1:
        i, depth = parents[i], depth + 1
    return depth


def test_chain_shape():
    tree = DraftTree.chain(torch.tensor([5, 6, 7]))
    assert tree.parents.tolist() == [-1, 0, 1]
    assert tree.depths.tolist() == [1, 2, 3]
    assert tree.positions(10).tolist() == [10, 11, 12, 13]
    assert [p.tolist() for p in tree.paths] == [[0, 1, 2]]
    assert tree.ancestors.tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_hand_made_tree():
    #        root
    #       /    \
    #      0      1
    #     / \      \
    #    2   3      4
    tree = DraftTree(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([-1, -1, 0, 0, 1]))
    assert tree.depths.tolist() == [1, 1, 2, 2, 2]
    assert sorted(p.tolist() for p in tree.paths) == [[0, 2], [0, 3], [1, 4]]
    assert tree.ancestors[3].tolist() == [True, False, False, True, False]


def test_empty_tree():
    tree = DraftTree.empty()
    assert len(tree) == 0
    assert tree.positions(4).tolist() == [4]
    assert tree.paths == []


@pytest.mark.parametrize(
    "parents, message",
    [([-1, 2, 0], "parent 2"), ([0], "parent 0"), ([-1, -2], "parent -2"), ([-1, 1], "parent 1")],
)
def test_bad_parents_raise(parents, message):
    with pytest.raises(ValueError, match=message):
        DraftTree(torch.arange(len(parents)), torch.tensor(parents))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same length"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"q \(3, 4\)"):
        DraftTree.chain(torch.tensor([1, 2]), q=torch.ones(3, 4))


@settings(max_examples=60, deadline=None)
@given(trees())
def test_derived_buffers_match_walking_the_parents(tree):
    parents = tree.parents.tolist()
    assert tree.depths.tolist() == [_depth_by_walking(parents, i) for i in range(len(tree))]
    for i in range(len(tree)):
        chain, j = set(), i
        while j != -1:
            chain.add(j)
            j = parents[j]
        assert set(tree.ancestors[i].nonzero().flatten().tolist()) == chain
    covered = set()
    for path in tree.paths:
        assert parents[path[0]] == -1
        assert all(parents[b] == a for a, b in zip(path.tolist(), path[1:].tolist()))
        covered |= set(path.tolist())
    assert covered == set(range(len(tree)))


def test_tree_spec_from_paths():
    from specdec.tree import TreeSpec

    spec = TreeSpec.from_paths([[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    assert spec.parents == (-1, -1, 0, 0, 2)
    assert spec.ranks == (0, 1, 0, 1, 0)
    assert spec.depth == 3 and len(spec) == 5


@pytest.mark.parametrize(
    "paths, message",
    [
        ([], "no paths"),
        ([[0, 0], [0]], r"comes before its parent \[0\]"),
        ([[0], [0]], "listed twice"),
        ([[0], []], "non-empty"),
        ([[-1]], "ranks >= 0"),
    ],
)
def test_bad_tree_specs_raise(paths, message):
    from specdec.tree import TreeSpec

    with pytest.raises(ValueError, match=message):
        TreeSpec.from_paths(paths)


def test_tree_spec_from_parents_rejects_cycles_and_order():
    from specdec.tree import TreeSpec

    assert TreeSpec.from_parents([-1, 0, 0, -1]).ranks == (0, 0, 1, 1)
    with pytest.raises(ValueError, match="parent 1"):
        TreeSpec.from_parents([1, 0])  # 0 -> 1 -> 0: a cycle
    with pytest.raises(ValueError, match="parent 2"):
        TreeSpec.from_parents([-1, 2, 0])  # a parent listed after its child
    with pytest.raises(ValueError, match="empty"):
        TreeSpec.from_parents([])
