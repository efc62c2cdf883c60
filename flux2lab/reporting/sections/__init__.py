"""One module per report section, in the order of the data flow: each reads what its stage wrote and returns a
`Section` (calibration, search, quality, run, speed; provenance sits beside them in `reporting.provenance`)."""
