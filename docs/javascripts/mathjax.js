// MathJax 3 for the Markdown pages (pymdownx.arithmatex marks \(…\) and \[…\]) and for the
// lessons rendered by mkdocs-jupyter (plain $…$ and $$…$$ in Markdown cells). Code is skipped.
// MathJax itself is served from this site (assets/mathjax/, copied in by docs/hooks/site.py), and
// loads its fonts and extensions from beside its own script, so pages typeset offline too.
window.MathJax = {
  tex: {inlineMath: [["\\(", "\\)"], ["$", "$"]], displayMath: [["\\[", "\\]"], ["$$", "$$"]],
        processEscapes: true, processEnvironments: true}
};
document$.subscribe(() => { MathJax.typesetPromise && MathJax.typesetPromise(); });
