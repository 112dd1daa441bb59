"""The shipped rule presets: TOML data files, a package only so that an installed sinkwatch finds them."""
