// MathJax 3 configuration, for two sources of math:
//  * Markdown pages: pymdownx.arithmatex (generic mode) turns $...$ and $$...$$ into
//    \( \) and \[ \] inside elements of class "arithmatex";
//  * lessons rendered by mkdocs-jupyter: notebook Markdown cells keep $ and $$.
// Code (pre, code) is never typeset. Re-typeset after each instant-navigation change.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
};

document$.subscribe(() => {
  if (window.MathJax && MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});
