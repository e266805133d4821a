// MathJax 3 for the Markdown pages (pymdownx.arithmatex marks \(…\) and \[…\]) and for the
// lessons rendered by mkdocs-jupyter (plain $…$ and $$…$$ in Markdown cells). Code is skipped.
window.MathJax = {
  tex: {inlineMath: [["\\(", "\\)"], ["$", "$"]], displayMath: [["\\[", "\\]"], ["$$", "$$"]],
        processEscapes: true, processEnvironments: true}
};
document$.subscribe(() => { MathJax.typesetPromise && MathJax.typesetPromise(); });
