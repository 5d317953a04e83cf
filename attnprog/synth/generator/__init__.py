"""The offline generator: DSL primitives, their vectorised mixtures, the golden library, probe texts."""
