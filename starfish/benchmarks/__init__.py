"""Tools over the library: the benchmarks behind the committed results (`starfish bench`,
`scale`, `latency`, `export-sizes`, `frontier`). The library never imports them."""
