"""Surgery: pure functions from (config, params) to a new (config, params), and their on-disk
streaming twins. Depth: `plan` (what goes where), `layerspec` and `recipe` (the two ways to write a plan),
`depth` (applying it)."""
