"""The report behind `ssb report`: reading run directories (`read`), the content as blocks (`content`), the
figures (`plots`) and rendering to HTML and markdown (`render`)."""
