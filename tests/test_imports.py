"""No import cycle among the project's modules, function-level and TYPE_CHECKING imports included."""

from __future__ import annotations

from import_graph import Edge, find_cycle, project_modules


def test_the_graph_sees_the_project() -> None:
    modules = project_modules()
    assert {"dograph.mixing", "dograph.step.runners", "dograph.runs.app", "baselines.doremi",
            "experiments.reproduce"} <= set(modules)


def test_no_import_cycle() -> None:
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_hidden_cycle(monkeypatch, tmp_path) -> None:
    # a function-level import back to the importer is a cycle too
    import import_graph

    (tmp_path / "dograph").mkdir()
    (tmp_path / "dograph" / "__init__.py").write_text("")
    (tmp_path / "dograph" / "a.py").write_text("from dograph.b import f\n")
    (tmp_path / "dograph" / "b.py").write_text("def f():\n    from dograph import a\n    return a\n")
    monkeypatch.setattr(import_graph, "REPO", tmp_path)
    monkeypatch.setattr(import_graph, "ROOTS", ("dograph",))
    import_graph.project_modules.cache_clear()
    import_graph.edges_of.cache_clear()
    try:
        assert import_graph.find_cycle() in (["dograph.a", "dograph.b", "dograph.a"],
                                             ["dograph.b", "dograph.a", "dograph.b"])
        assert Edge("dograph.b", "dograph.a", 2, False, ("a",)) in import_graph.edges_of("dograph.b")
    finally:
        import_graph.project_modules.cache_clear()
        import_graph.edges_of.cache_clear()
